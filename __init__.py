"""funkflow: Funk SVD by numba SGD kernels under a DSGD schedule on Dask.

The repository's ``pipeline/`` (the driver: config, stages, cluster, CLI, API) and ``tasks/`` (what runs on
workers) install as ``funkflow.pipeline`` and ``funkflow.tasks``; ``configs/`` as ``funkflow.configs``.
"""


def __getattr__(name: str):
    # ``from funkflow import FunkSVD`` without importing the API (and pyarrow) for every CLI start.
    if name == "FunkSVD":
        from funkflow.pipeline.app.api import FunkSVD

        return FunkSVD
    raise AttributeError(f"module 'funkflow' has no attribute {name!r}")
