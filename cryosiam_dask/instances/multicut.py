"""CryoSiam's multicut post-processing (``postprocessing: True``): whole volume and chunked, same result.

After the watershed, CryoSiam smooths the boundary map (:mod:`~cryosiam_dask.instances.bilateral`), builds the
region adjacency graph of the fragments (background = node 0, face neighbours) with the mean smoothed boundary
over both voxels of every touching pair as edge probability, turns it into costs with elf's formula,
solves the multicut (greedy additive contraction, then Kernighan-Lin: bioimage-cpp, the ``multicut``
extra) and joins ``ws[seg > 0] = 0`` with the multicut labels (``skimage.segmentation.join_segmentations``).
Here that join is a lookup table from watershed ids to final ids, so the chunked path needs only
per-chunk edge sums and counts, one small graph solved on the client and a per-chunk lookup: never the
volume in memory.

The ids equal CryoSiam's (with bioimage-cpp the background's cluster is 0; see the golden fixture's README for
nifty's numbering difference). All arrays are (z, y, x).
"""

from __future__ import annotations

import itertools
from typing import Any

import dask
import dask.array as da
import numpy as np

from cryosiam_dask.errors import NotSupportedError
from cryosiam_dask.instances.bilateral import bilateral_filter, bilateral_filter_valid, bilateral_reach
from cryosiam_dask.instances.edges import EdgeStats, edge_stats, merge_edge_stats

__all__ = [
    "MULTICUT_NEEDS",
    "check_multicut_available",
    "edge_stats",
    "final_id_table",
    "merge_edge_stats",
    "multicut_chunked",
    "multicut_postprocess",
    "probabilities_to_costs",
    "solve_multicut",
]

MULTICUT_NEEDS = "the multicut needs bioimage-cpp, a dependency of cryosiam_dask: pip install bioimage-cpp"

def check_multicut_available() -> None:
    """Raise NotSupportedError naming bioimage-cpp when it cannot be imported (a broken install)."""
    try:
        import bioimage_cpp  # noqa: F401
    except ImportError as e:
        raise NotSupportedError(f"parameters.network.postprocessing is True: {MULTICUT_NEEDS} "
                                "(or set 'postprocessing: False' for the seeded watershed alone)") from e


def probabilities_to_costs(probs: np.ndarray, *, boundary_bias: float) -> np.ndarray:
    """elf 0.5.2 ``transform_probabilities_to_costs`` with numpy 1.26 dtypes (float32 throughout).

    ``p' = 0.998 p + 0.001``; ``cost = log((1 - p') / p') + log((1 - beta) / beta)``. With float32 ``probs``
    numpy 1.x keeps every step in float32 (value-based casting); the bias term, an ``np.float64`` scalar,
    is cast to float32 explicitly so numpy 2 (NEP 50) gives the same values.

    Parameters
    ----------
    probs : ndarray, shape (E,), float32
        Mean boundary probability per edge.
    boundary_bias : float
        beta in (0, 1); higher gives more cuts.

    Returns
    -------
    ndarray, shape (E,), float32
        Edge costs (positive = attractive, negative = repulsive).
    """
    probs = np.asarray(probs, dtype=np.float32)
    p_min = 0.001
    p_max = 1.0 - p_min
    costs = np.float32(p_max - p_min) * probs + np.float32(p_min)
    bias = np.float32(np.log((1.0 - boundary_bias) / boundary_bias))
    return (np.log((np.float32(1.0) - costs) / costs) + bias).astype(np.float32)


def solve_multicut(
    u: np.ndarray,
    v: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
    *,
    boundary_bias: float,
    n_nodes: int | None = None,
) -> np.ndarray:
    """Multicut of the fragment graph: GAEC warm start + Kernighan-Lin (bioimage-cpp), as elf calls it.

    Edge probabilities are ``sums / counts`` rounded to float32 (nifty returns float32 features), turned
    into costs by :func:`probabilities_to_costs`. Node ids may be sparse (absent watershed ids): the nodes
    that occur in an edge, plus node 0, are compacted to ``0..m-1`` (order kept, so the solver sees the
    same graph, edge order included), solved, and mapped back. Clusters are numbered in node order
    (first occurrence), so the background node 0 is in cluster 0, as bioimage-cpp returns them.

    Parameters
    ----------
    u, v : ndarray, shape (E,), integer
        Edges (u < v), e.g. from :func:`edge_stats` / :func:`merge_edge_stats`.
    sums : ndarray, shape (E,), float64
        Summed edge-map values per edge.
    counts : ndarray, shape (E,), int64
        Number of voxels summed per edge.
    boundary_bias : float
        elf's beta.
    n_nodes : int, optional
        Number of node ids (``max watershed id + 1``); default ``max(v) + 1``.

    Returns
    -------
    ndarray, shape (n_nodes,), uint64
        Cluster label per node id. Nodes without edges get their own cluster, numbered after the others.
    """
    from bioimage_cpp import graph as bgraph

    u = np.asarray(u, dtype=np.uint64)
    v = np.asarray(v, dtype=np.uint64)
    if n_nodes is None:
        n_nodes = int(v.max()) + 1 if v.size else 1
    n_nodes = int(n_nodes)
    if u.size and int(v.max()) >= n_nodes:
        raise ValueError(f"edge node id {int(v.max())} >= n_nodes {n_nodes}")
    nodes = np.unique(np.concatenate([np.zeros(1, np.uint64), u, v]))  # sorted, contains 0
    if u.size:
        cu = np.searchsorted(nodes, u).astype(np.uint64)
        cv = np.searchsorted(nodes, v).astype(np.uint64)
        probs = (np.asarray(sums, dtype=np.float64) / np.asarray(counts, dtype=np.float64)).astype(np.float32)
        costs = probabilities_to_costs(probs, boundary_bias=boundary_bias)
        g = bgraph.UndirectedGraph.from_edges(int(nodes.size), np.stack([cu, cv], axis=1))
        # edge ids follow insertion order; reorder the costs if the graph sorted/deduplicated them
        eid = np.asarray(g.find_edges(np.stack([cu, cv], axis=1)), dtype=np.int64)
        edge_costs = np.zeros(g.number_of_edges, dtype=np.float64)
        edge_costs[eid] = costs
        objective = bgraph.multicut.MulticutObjective(g, edge_costs)
        compact = np.asarray(bgraph.multicut.KernighanLinMulticut().optimize(objective), dtype=np.uint64)
    else:
        compact = np.arange(nodes.size, dtype=np.uint64)
    # renumber clusters by first occurrence in node order (bioimage-cpp already does; made explicit)
    _, first, inverse = np.unique(compact, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.uint64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size, dtype=np.uint64)
    compact = rank[inverse.ravel()]
    out = np.empty(n_nodes, dtype=np.uint64)
    isolated = np.ones(n_nodes, dtype=bool)
    isolated[nodes.astype(np.int64)] = False
    out[nodes.astype(np.int64)] = compact
    out[isolated] = np.arange(first.size, first.size + int(isolated.sum()), dtype=np.uint64)
    return out


def final_id_table(node_labels: np.ndarray, present_ids: np.ndarray) -> np.ndarray:
    """Lookup table watershed id -> final instance id, numbered as CryoSiam's multicut step does.

    CryoSiam: ``seg = node_labels[ws]; ws[seg > 0] = 0; out = join_segmentations(seg, ws)``.
    ``join_segmentations`` numbers the distinct pairs ``(seg, ws)`` sequentially in sorted order, with
    ``(0, 0) -> 0``. So: fragments in cluster 0 (the background's) keep separate ids, ordered by watershed
    id, then every other cluster becomes one instance, in the order of its multicut label.

    Parameters
    ----------
    node_labels : ndarray, shape (N,), integer
        Cluster label per watershed id (``N > max(present_ids)``), e.g. from :func:`solve_multicut`.
    present_ids : ndarray, shape (K,), integer
        Watershed ids occurring in the volume (0 included if there is background).

    Returns
    -------
    ndarray, shape (N,), uint32
        Final id per watershed id; 0 for the background (when in cluster 0) and for absent ids.
    """
    node_labels = np.asarray(node_labels, dtype=np.uint64)
    ids = np.unique(np.asarray(present_ids, dtype=np.uint64))
    seg = node_labels[ids.astype(np.int64)]
    ws_key = np.where(seg > 0, np.uint64(0), ids)
    keys = np.stack([seg, ws_key], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    start = 0 if (uniq[0, 0] == 0 and uniq[0, 1] == 0) else 1
    lut = np.zeros(node_labels.size, dtype=np.uint32)
    lut[ids.astype(np.int64)] = (inverse.ravel() + start).astype(np.uint32)
    return lut


def multicut_postprocess(
    ws_labels: np.ndarray, boundaries: np.ndarray, *, boundary_bias: float
) -> np.ndarray:
    """CryoSiam's multicut post-processing of watershed fragments, whole volume.

    bilateral filter of ``boundaries`` -> :func:`edge_stats` -> :func:`solve_multicut` ->
    :func:`final_id_table` -> apply. With ``boundary_bias == 1`` CryoSiam skips the multicut and returns
    the watershed labels unchanged.

    Parameters
    ----------
    ws_labels : ndarray, shape (Z, Y, X), uint32
        Watershed fragments (0 = background) in (z, y, x) order.
    boundaries : ndarray, shape (Z, Y, X), float32
        Raw (lamella-masked) boundary probability map, not yet smoothed.
    boundary_bias : float
        elf's beta.

    Returns
    -------
    ndarray, shape (Z, Y, X), uint32
        Instances with ids 1..n (CryoSiam returns the same values as uint64).
    """
    ws_labels = np.asarray(ws_labels)
    if boundary_bias == 1:
        return ws_labels.astype(np.uint32, copy=False)
    check_multicut_available()  # one line naming bioimage-cpp, before the bilateral filter runs
    smoothed = bilateral_filter(np.asarray(boundaries))
    u, v, sums, counts = edge_stats(ws_labels, smoothed)
    n_nodes = int(ws_labels.max()) + 1
    node_labels = solve_multicut(u, v, sums, counts, boundary_bias=boundary_bias, n_nodes=n_nodes)
    lut = final_id_table(node_labels, np.unique(ws_labels))
    return lut[ws_labels]


def _chunk_edge_stats(
    labels: np.ndarray, boundary: np.ndarray, *, pad: tuple[tuple[int, int], ...], low_halo: tuple[int, ...],
    domain_sigma: float, range_sigma: float,
) -> EdgeStats:
    """Edge statistics of one chunk (+ a 1-voxel low halo), its boundary map smoothed here.

    `boundary` covers the labels' region plus the bilateral reach, clipped to the volume; `pad` is what the
    clipping removed per side, replaced by edge replication (ITK's zero-flux boundary at the volume's faces).
    """
    padded = np.pad(np.asarray(boundary, np.float32), pad, mode="edge") if any(map(any, pad)) else boundary
    smoothed = bilateral_filter_valid(padded, domain_sigma=domain_sigma, range_sigma=range_sigma)
    return edge_stats(np.asarray(labels), np.asarray(smoothed), low_halo=low_halo)


def multicut_chunked(
    labels: da.Array, boundary: da.Array, *, boundary_bias: float, domain_sigma: float = 1.0,
    range_sigma: float = 0.1, compute: Any = dask.compute,
) -> tuple[da.Array, int]:
    """:func:`multicut_postprocess` of a chunked volume: the same labels, chunk by chunk.

    One task per chunk smooths its part of the boundary map (with the bilateral reach as halo) and sums the
    smoothed values over the touching voxel pairs of different labels, the pairs across a chunk's low faces
    included (a 1-voxel low halo: each cross-face pair is counted once, by the higher chunk); the sums are
    reduced on the client, the small graph is solved there, and the result is a per-chunk lookup.

    Parameters
    ----------
    labels : (Z, Y, X) dask.array.Array of uint32
        Watershed fragments with global ids (0 = background), e.g. from
        :func:`~cryosiam_dask.instances.memory_store.segment_instances`; cheap to read (stored or persisted).
    boundary : (Z, Y, X) dask.array.Array of float32
        The raw boundary map (after the lamella mask), not smoothed.
    boundary_bias : float
        elf's beta; 1 returns `labels` unchanged, as CryoSiam.
    compute : callable, default dask.compute
        Computes the per-chunk edge statistics (the run layer passes its tomogram's lane).

    Returns
    -------
    labels : (Z, Y, X) dask.array.Array of uint32
        The instances, ids 1..n as CryoSiam numbers them.
    n_instances : int
    """
    if boundary_bias == 1:
        return labels, -1
    check_multicut_available()  # before any chunk is smoothed
    boundary = boundary.rechunk(labels.chunks)
    shape = tuple(int(s) for s in labels.shape)
    r = bilateral_reach(domain_sigma)
    bounds = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in labels.chunks]
    task = dask.delayed(_chunk_edge_stats, pure=True)
    tasks = []
    for index in itertools.product(*(range(len(c)) for c in labels.chunks)):
        lo = [int(bounds[a][i]) - (1 if i > 0 else 0) for a, i in enumerate(index)]
        hi = [int(bounds[a][i + 1]) for a, i in enumerate(index)]
        b0 = [max(0, v - r) for v in lo]
        b1 = [min(n, v + r) for v, n in zip(hi, shape, strict=True)]
        pad = tuple((b0[a] - (lo[a] - r), (hi[a] + r) - b1[a]) for a in range(3))
        region = tuple(slice(lo[a], hi[a]) for a in range(3))
        reach = tuple(slice(b0[a], b1[a]) for a in range(3))
        tasks.append(task(labels[region], boundary[reach], pad=pad,
                          low_halo=tuple(int(i > 0) for i in index), domain_sigma=domain_sigma,
                          range_sigma=range_sigma))
    u, v, sums, counts = merge_edge_stats(list(compute(*tasks)))
    present = np.unique(np.concatenate([u, v, np.zeros(1, np.uint64)]))
    n_nodes = int(present.max()) + 1
    node_labels = solve_multicut(u, v, sums, counts, boundary_bias=boundary_bias, n_nodes=n_nodes)
    lut = final_id_table(node_labels, present)
    meta = np.empty((0, 0, 0), np.uint32)
    out = labels.map_blocks(_apply_lut, lut, dtype=np.uint32, meta=meta)
    return out, int(lut.max()) if lut.size else 0


def _apply_lut(block: Any, lut: np.ndarray) -> Any:
    from cryosiam_dask.backend import get_xp

    xp = get_xp(block)
    return xp.asarray(lut)[block]
