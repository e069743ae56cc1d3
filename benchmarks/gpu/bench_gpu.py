"""GPU benchmark: the network alone and the post-processing alone, output voxels/s per GPU, time per stage.

Run by ``benchmarks/gpu/run_device.sh`` on the device machine (or alone once the wheels are installed):

- **network**: the real architecture (:func:`cryosiam_dask.testing.checkpoints.write_checkpoint`, seeded
  random weights: the timing does not depend on them), patch 64, one storage chunk through the production path
  (``predict_maps`` → ``run_block`` → ``predict_block`` → ``run_network``, dask's synchronous scheduler, no
  cluster), for ``exact`` and ``fast`` × float32 and bf16 × each batch size. Output voxels/s = chunk voxels
  / wall (median of ``--repeats`` after a warm-up that also pays cuDNN's autotuning). A second, instrumented
  run (synchronising around each piece) gives the share of time per stage: window assembly + normalisation
  on the host, host→device copy, forward, device→host copy, the rest (batch stacking, writes). The maps'
  max-abs difference against exact float32 is reported. Then ``run_network`` one batch at a time against
  ``run_network_batches`` (copies overlapped with compute) on the same windows.
- **allocator** (CUDA only, each in a fresh process): the same network loop with torch's caching allocator,
  with RMM's default resource for torch and cupy (what ``LocalCUDACluster(rmm_pool_size=None,
  rmm_allocator_external_lib_list=[...])`` sets: no pool) and with an RMM pool / async pool.
- **post-processing**: ``instances.windows.segment_window`` on one window (chunk + halo) of ball maps, numpy
  against cupy, with the share of each stage (host→device copy, smoothing + EDT, markers, watershed, the
  rest: components, keys). The watershed is skimage's on the host for cupy blocks too (CryoSiam's partition);
  the array flood (``method="flood"``) is timed beside it for reference, with whether it gave the same
  partition.

``--dry-run``: tiny sizes and the tiny architecture, on CPU when there is no GPU (cupy parts skipped), to
check that everything imports and runs. Results: ``bench_gpu.json`` under ``--out`` (default ``$OUT`` or
``bench_out/gpu``).

    python -m benchmarks.gpu.bench_gpu            # on the GPU machine, ~3-5 minutes on an H200
    python -m benchmarks.gpu.bench_gpu --dry-run  # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import table, write_results

PP_PARAMS = dict(min_center_distance=1, max_center_distance=4, threshold_foreground=0.65, distance_type=1)


def log(msg: str) -> None:
    """Progress line with the elapsed time."""
    print(f"[bench_gpu +{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


_T0 = time.perf_counter()


# --------------------------------------------------------------------------- environment
def environment() -> dict[str, Any]:
    """Versions and devices seen by this process (what is missing is said, not raised)."""
    env: dict[str, Any] = {"python": sys.version.split()[0]}
    import torch

    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.cuda.is_available()
    if env["torch_cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        env["cudnn"] = torch.backends.cudnn.version()
    for name in ("cupy", "cucim", "rmm", "dask_cuda", "dask", "distributed", "zarr"):
        try:
            mod = __import__(name)
            env[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # a CUDA library that fails to load is reported too
            env[name] = f"unavailable ({type(e).__name__}: {str(e)[:80]})"
    env["cupy_gpu"] = cupy_reason() is None
    return env


def cupy_reason() -> str | None:
    """Why cupy cannot be used here, or None."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "cupy sees no CUDA device"
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:120]}"
    return None


class StageTimer:
    """Accumulate wall time per named stage, synchronising the device around each (for shares only)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.seconds[name] += time.perf_counter() - t0


def _torch_sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def shares(parts: dict[str, float], total: float) -> dict[str, float]:
    """Each stage's share of `total` (with ``other`` = what the stages leave), in percent."""
    out = {k: 100 * v / total for k, v in parts.items()}
    out["other"] = max(0.0, 100 - sum(out.values()))
    return out


def fmt_shares(s: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}%" for k, v in s.items())


# --------------------------------------------------------------------------- network
def make_checkpoint(folder: Path, arch: str, patch: int) -> Path:
    from cryosiam_dask.testing.checkpoints import write_checkpoint

    return write_checkpoint(folder / f"{arch}_p{patch}.ckpt", arch=arch, patch_size=patch, seed=0)


def make_volume(shape: tuple[int, int, int]) -> np.ndarray:
    from cryosiam_dask.testing.synthetic import make_tomogram

    n = max(4, int(np.prod(shape) / 20000))
    return make_tomogram(shape, n_particles=n, radii=(4, 7), seed=0).tomogram.astype(np.float32)


def predict_chunk(volume: np.ndarray, ckpt: Path, *, tiling: str, amp: str | None, batch_size: int,
                  device: str) -> tuple[np.ndarray, ...]:
    """The production network path on one storage chunk holding the whole volume (synchronous scheduler)."""
    import dask
    import dask.array as da

    from cryosiam_dask.network.predict import predict_maps

    maps = predict_maps(da.from_array(volume, chunks=volume.shape), ckpt, tiling=tiling,
                        batch_size=batch_size, device=device, amp=amp)
    return dask.compute(*maps, scheduler="synchronous")


@contextlib.contextmanager
def instrumented_network(timer: StageTimer) -> Iterator[None]:
    """Time ``predict._assemble_window`` and the pieces of each network call while the context is open.

    The stages are timed one batch at a time (no upload/compute overlap), so their shares add up.
    """
    from cryosiam_dask.network import predict, runtime

    assemble, run = predict._assemble_window, predict.run_network_batches

    def timed_assemble(*args: Any, **kwargs: Any) -> np.ndarray:
        with timer("assemble+normalise"):
            return assemble(*args, **kwargs)

    def timed_run(model: Any, batch: np.ndarray, *, kept: Any = None, amp: str | None = None) -> np.ndarray:
        with timer("h2d"):
            device = runtime._device_of(model)
            x = runtime._as_input(batch)
            x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x
        with timer("forward"):
            y = runtime._forward(model, x, kept, amp)
        with timer("d2h"):
            return y.cpu().numpy()

    def timed_batches(model: Any, batches: Any, *, kept: Any = None, amp: str | None = None) -> Iterator[Any]:
        for batch in batches:
            yield timed_run(model, batch, kept=kept, amp=amp)

    predict._assemble_window, predict.run_network_batches = timed_assemble, timed_batches
    try:
        yield
    finally:
        predict._assemble_window, predict.run_network_batches = assemble, run


def bench_network(args: argparse.Namespace, device: str, folder: Path) -> list[dict[str, Any]]:
    shape = tuple(args.shape)
    n_vox = int(np.prod(shape))
    ckpt = make_checkpoint(folder, args.arch, args.patch)
    volume = make_volume(shape)
    log(f"network: {args.arch} architecture, patch {args.patch}, chunk {shape} on {device}")
    rows: list[dict[str, Any]] = []
    reference = None
    sync = _torch_sync(device)
    for tiling in ("exact", "fast"):
        for amp in (None, "bf16"):
            for batch_size in args.batch_sizes:
                name = f"{tiling} {amp or 'fp32'} b{batch_size}"
                kw = dict(tiling=tiling, amp=amp, batch_size=batch_size, device=device)
                t0 = time.perf_counter()
                maps = predict_chunk(volume, ckpt, **kw)
                warm = time.perf_counter() - t0
                walls = []
                for _ in range(args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    predict_chunk(volume, ckpt, **kw)
                    sync()
                    walls.append(time.perf_counter() - t0)
                wall = statistics.median(walls)
                timer = StageTimer(sync)
                with instrumented_network(timer):
                    t0 = time.perf_counter()
                    predict_chunk(volume, ckpt, **kw)
                    total = time.perf_counter() - t0
                if reference is None:
                    reference = maps
                diff = [float(np.abs(a - b).max()) for a, b in zip(maps, reference, strict=True)]
                row = {"stage": "network", "run": name, "tiling": tiling, "amp": amp or "fp32",
                       "batch_size": batch_size, "wall_s": wall, "first_call_s": warm,
                       "voxels_per_s": n_vox / wall, "shares_%": shares(timer.seconds, total),
                       "max_abs_vs_exact_fp32": diff}
                rows.append(row)
                log(f"  {name}: {row['voxels_per_s'] / 1e6:.2f} M voxels/s (wall {wall:.3f} s, first call "
                    f"{warm:.2f} s); {fmt_shares(row['shares_%'])}; max-abs vs exact fp32 "
                    + "/".join(f"{d:.1e}" for d in diff))
    rows += bench_overlap(args, device, ckpt)
    return rows


def _interior_batches(patch: int, batch_size: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch_size, patch, patch, patch)).astype(np.float32) for _ in range(n)]


def network_loop(model: Any, patch: int, batch_size: int, n: int, pipelined: bool) -> float:
    """Seconds for `n` batches of interior exact windows (kept = the central half), after one warm-up."""
    from cryosiam_dask.network import runtime

    q = patch // 4
    kept = ((q, patch - q),) * 3
    batches = _interior_batches(patch, batch_size, n)
    runtime.run_network(model, batches[0], kept=kept)
    t0 = time.perf_counter()
    if pipelined:
        for _ in runtime.run_network_batches(model, iter(batches), kept=kept):
            pass
    else:
        for b in batches:
            runtime.run_network(model, b, kept=kept)
    return time.perf_counter() - t0


def bench_overlap(args: argparse.Namespace, device: str, ckpt: Path) -> list[dict[str, Any]]:
    from cryosiam_dask.network import runtime

    if device == "cuda":
        runtime.set_cuda_flags(tf32=False)
    model = runtime.get_network(ckpt, device)
    b = max(args.batch_sizes)
    kept_vox = (args.patch - 2 * (args.patch // 4)) ** 3 * b * args.loop_batches
    rows = []
    for pipelined in (False, True):
        s = network_loop(model, args.patch, b, args.loop_batches, pipelined)
        name = "run_network_batches (overlapped)" if pipelined else "run_network, one batch at a time"
        rows.append({"stage": "network loop", "run": name, "batch_size": b, "wall_s": s,
                     "voxels_per_s": kept_vox / s})
        log(f"  loop exact fp32 b{b} x{args.loop_batches}: {name}: {kept_vox / s / 1e6:.2f} M kept voxels/s")
    return rows


# --------------------------------------------------------------------------- allocators (fresh processes)
def allocator_one(spec: dict[str, Any]) -> dict[str, Any]:
    """In this (fresh) process: set the allocator of `spec`, then time the network loop."""
    kind = spec["allocator"]
    if kind != "torch":
        import rmm

        if kind == "rmm-pool":
            rmm.reinitialize(pool_allocator=True, initial_pool_size=spec.get("pool", 8 * 2**30))
        elif kind == "rmm-async":
            rmm.mr.set_current_device_resource(rmm.mr.CudaAsyncMemoryResource())
        from dask_cuda.plugins import enable_rmm_memory_for_library

        for lib in ("cupy", "torch"):
            enable_rmm_memory_for_library(lib)
    from cryosiam_dask.network import runtime

    runtime.set_cuda_flags(tf32=False)
    model = runtime.get_network(spec["ckpt"], "cuda")
    s = network_loop(model, spec["patch"], spec["batch_size"], spec["n"], pipelined=False)
    kept_vox = (spec["patch"] - 2 * (spec["patch"] // 4)) ** 3 * spec["batch_size"] * spec["n"]
    return {"stage": "allocator", "run": kind, "batch_size": spec["batch_size"], "wall_s": s,
            "voxels_per_s": kept_vox / s}


def bench_allocators(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    import subprocess

    ckpt = make_checkpoint(folder, args.arch, args.patch)
    rows = []
    for kind in ("torch", "rmm", "rmm-pool", "rmm-async"):
        spec = {"allocator": kind, "ckpt": str(ckpt), "patch": args.patch,
                "batch_size": max(args.batch_sizes), "n": args.loop_batches}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu.bench_gpu", "--one", json.dumps(spec)],
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            rows.append({"stage": "allocator", "run": kind, "error": proc.stderr.strip()[-400:]})
            log(f"  allocator {kind}: FAILED {proc.stderr.strip()[-300:]}")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        log(f"  allocator {kind}: {row['voxels_per_s'] / 1e6:.2f} M kept voxels/s ({row['wall_s']:.3f} s)")
    return rows


# --------------------------------------------------------------------------- post-processing
def window_case(core: tuple[int, int, int], halo: int) -> dict[str, Any]:
    """Ball maps of one window (core + halo on every side) and segment_window's arguments for it."""
    from benchmarks.bench_instances import setup
    from cryosiam_dask.instances.params import PostParams

    wshape = tuple(c + 2 * halo for c in core)
    fg, dist = setup(wshape, seed=1)
    kwargs = dict(start=(halo, halo, halo), core=tuple(slice(halo, halo + c) for c in core),
                  cut=((True, True),) * 3, shape=tuple(c + 4 * halo for c in core),
                  params=PostParams(**PP_PARAMS))
    return {"fg": fg, "dist": dist, "kwargs": kwargs, "core_voxels": int(np.prod(core))}


def postprocess_stages(fg: Any, dist: Any, timer: StageTimer, flood_passes: int = 0) -> Any:
    """The pieces of segment_window in sequence, timed (the watershed labels are returned).

    `flood_passes` > 0: the array flood (at most that many passes) instead of skimage's watershed.
    """
    from cryosiam_dask.backend import get_xp
    from cryosiam_dask.instances.block import final_maps, find_markers_with_levels
    from cryosiam_dask.instances.watershed import flood_watershed, seeded_watershed

    p = PP_PARAMS
    with timer("smooth+edt"):
        mask, d = final_maps(fg, dist, threshold_foreground=p["threshold_foreground"],
                             distance_type=p["distance_type"])
    with timer("markers"):
        markers, _ = find_markers_with_levels(d, p["min_center_distance"], p["max_center_distance"])
    xp = get_xp(d)
    if flood_passes:
        with timer("watershed (flood)"):
            return flood_watershed(-d.astype(xp.float64), markers, mask, max_passes=flood_passes)
    with timer("watershed"):
        return seeded_watershed(-d.astype(xp.float64), markers, mask)


def bench_postprocessing(args: argparse.Namespace) -> list[dict[str, Any]]:
    from cryosiam_dask.instances.windows import segment_window

    def window_keys(fg: Any, dist: Any, **kw: Any) -> Any:
        return segment_window(fg, dist, **kw).keys

    case = window_case(tuple(args.pp_core), args.halo)
    fg, dist, kw = case["fg"], case["dist"], case["kwargs"]
    log(f"post-processing: window {fg.shape} (core {tuple(args.pp_core)}, halo {args.halo})")
    rows = []
    # numpy
    window_keys(fg[:24, :24, :24], dist[:24, :24, :24], **{**kw, "core": (slice(0, 24),) * 3})  # warm-up
    t0 = time.perf_counter()
    keys_np = window_keys(fg, dist, **kw)
    wall = time.perf_counter() - t0
    timer = StageTimer(lambda: None)
    labels_np = postprocess_stages(fg, dist, timer)
    rows.append({"stage": "post-processing", "run": "numpy (1 core)", "wall_s": wall,
                 "voxels_per_s": case["core_voxels"] / wall, "shares_%": shares(timer.seconds, wall),
                 "n_keys": int(np.unique(keys_np).size - 1)})
    log(f"  numpy: {case['core_voxels'] / wall / 1e6:.2f} M voxels/s ({wall:.2f} s); "
        f"{fmt_shares(rows[-1]['shares_%'])}")
    reason = cupy_reason()
    if reason:
        log(f"  cupy: skipped ({reason})")
        rows.append({"stage": "post-processing", "run": "cupy", "skipped": reason})
        return rows
    import cupy

    sync = cupy.cuda.runtime.deviceSynchronize
    small = [cupy.asarray(a[:24, :24, :24]) for a in (fg, dist)]
    window_keys(*small, **{**kw, "core": (slice(0, 24),) * 3})  # warm-up: kernels compiled once
    postprocess_stages(*[cupy.asarray(a) for a in (fg, dist)], StageTimer(sync))  # and at full size
    walls = []
    for _ in range(max(1, args.repeats)):
        sync()
        t0 = time.perf_counter()
        fg_d, dist_d = cupy.asarray(fg), cupy.asarray(dist)
        keys_d = window_keys(fg_d, dist_d, **kw)
        keys_h = keys_d.get()
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    timer = StageTimer(sync)
    with timer("h2d"):
        fg_d, dist_d = cupy.asarray(fg), cupy.asarray(dist)
    labels_d = postprocess_stages(fg_d, dist_d, timer)
    with timer("d2h"):
        keys_d.get()
    same = bool(np.array_equal(keys_h, keys_np)) and bool(np.array_equal(labels_d.get(), labels_np))
    rows.append({"stage": "post-processing", "run": "cupy (skimage watershed on host)", "wall_s": wall,
                 "voxels_per_s": case["core_voxels"] / wall, "shares_%": shares(timer.seconds, wall),
                 "identical_to_numpy": same, "speedup_vs_numpy": rows[0]["wall_s"] / wall})
    speedup = rows[0]["wall_s"] / wall
    log(f"  cupy: {case['core_voxels'] / wall / 1e6:.2f} M voxels/s ({wall:.2f} s, x{speedup:.1f} numpy); "
        f"identical keys: {same}; {fmt_shares(rows[-1]['shares_%'])}")
    timer = StageTimer(sync)
    try:
        flood = postprocess_stages(fg_d, dist_d, timer, flood_passes=args.flood_passes)
        from cryosiam_dask.testing.strategies import assert_same_partition

        try:
            assert_same_partition(flood.get(), labels_np)
            same_partition = True
        except AssertionError:
            same_partition = False
        t = timer.seconds["watershed (flood)"]
        rows.append({"stage": "post-processing", "run": "cupy flood watershed alone", "wall_s": t,
                     "same_partition_as_skimage": same_partition})
        log(f"  cupy flood watershed alone: {t:.2f} s; same partition as skimage: {same_partition}")
    except Exception as e:  # FloodNotConverged on plateaus
        rows.append({"stage": "post-processing", "run": "cupy flood watershed alone", "error": str(e)[:200]})
        log(f"  cupy flood watershed: {type(e).__name__}: {e}")
    return rows


# --------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, tiny architecture, CPU if no GPU")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--arch", choices=["real", "tiny"], default="real")
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256], help="network chunk (z, y, x)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--loop-batches", type=int, default=24, help="batches of the overlap/allocator loops")
    p.add_argument("--pp-core", type=int, nargs=3, default=[96, 192, 192], help="post-processing chunk")
    p.add_argument("--flood-passes", type=int, default=3000, help="bound of the array flood (reference run)")
    p.add_argument("--halo", type=int, default=32)
    p.add_argument("--skip", nargs="*", default=[], choices=["network", "allocator", "post"])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench_out/gpu"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:  # tiny values for what was not given explicitly
        tiny = dict(arch="tiny", patch=32, shape=[32, 48, 40], batch_sizes=[2], repeats=1, loop_batches=3,
                    pp_core=[24, 32, 32], halo=12)
        for key, value in tiny.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    if args.one:
        print(json.dumps(allocator_one(json.loads(args.one))))
        return []
    logging.basicConfig(level=logging.WARNING)
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment()
    log("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if "network" not in args.skip:
            rows += bench_network(args, device, Path(tmp))
        if "allocator" not in args.skip:
            if device == "cuda" and not str(env.get("rmm", "")).startswith("unavailable"):
                log("allocators (fresh process each)")
                rows += bench_allocators(args, Path(tmp))
            else:
                log("allocators: skipped (needs CUDA and rmm)")
        if "post" not in args.skip:
            rows += bench_postprocessing(args)
    print()
    print(f"## GPU benchmark ({env.get('gpu', device)}): output voxels/s per GPU")
    print(table([r for r in rows if "voxels_per_s" in r],
                ["stage", "run", "batch_size", "wall_s", "voxels_per_s"]))
    print()
    print("share of time per stage (instrumented run, device synchronised around each stage)")
    for r in rows:
        if "shares_%" in r:
            print(f"- {r['stage']} / {r['run']}: {fmt_shares(r['shares_%'])}")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "one")}
    path = write_results(args.out, "bench_gpu" + ("_dry_run" if args.dry_run else ""),
                         {**config, "device": device, "environment": env}, rows)
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
