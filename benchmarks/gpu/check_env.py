"""Check that what the GPU run needs imports: required modules fail the check, GPU ones are reported.

    python -m benchmarks.gpu.check_env          # exit 1 when a required module does not import
"""

from __future__ import annotations

import importlib
import sys

REQUIRED = [
    "numpy", "scipy", "skimage", "h5py", "yaml", "pytest", "hypothesis", "torch", "dask", "distributed",
    "zarr", "numcodecs", "mrcfile", "monai", "monai.networks.nets", "pydantic", "typer", "filelock", "pandas",
    "psutil",
    "cryosiam_dask", "cryosiam_dask.run.driver", "cryosiam_dask.network.prepared",
    "cryosiam_dask.instances.chunked", "cryosiam_dask.testing.checkpoints",
]
OPTIONAL = [
    "ome_zarr", "starfile", "cupy", "cupyx.scipy.ndimage", "cucim", "cucim.skimage.segmentation", "rmm",
    "rmm.allocators.torch", "dask_cuda",
]


def check(names: list[str]) -> dict[str, str | None]:
    """Import each module; return name -> None (ok) or the error, one line."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            mod = importlib.import_module(name)
            out[name] = None
            version = getattr(mod, "__version__", "")
            where = getattr(mod, "__file__", "") or ""
            print(f"  ok   {name} {version} {where}")
        except Exception as e:  # any failure to import is reported
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            print(f"  FAIL {name}: {out[name]}")
    return out


def main() -> int:
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print("required:")
    bad = [n for n, e in check(REQUIRED).items() if e]
    print("optional (GPU, output formats):")
    check(OPTIONAL)
    import torch

    cuda = torch.cuda.is_available()
    gpus = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda else ""
    print(f"torch {torch.__version__}, cuda available: {cuda}{gpus}")
    try:
        import cupy

        print(f"cupy sees {cupy.cuda.runtime.getDeviceCount()} CUDA device(s)")
    except Exception as e:
        print(f"cupy: no device ({type(e).__name__})")
    if bad:
        print(f"MISSING required modules: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
