"""``python -m cryosiam_dask``: the command line."""

from cryosiam_dask.cli import main

if __name__ == "__main__":
    main()
