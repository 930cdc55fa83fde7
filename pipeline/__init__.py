"""funkflow's driver side: config, stages, the DSGD driver, cluster set-up, the CLI and the Python API."""


def __getattr__(name: str):
    # ``from pipeline import FunkSVD`` without importing the API (and pyarrow) for every CLI start.
    if name == "FunkSVD":
        from pipeline.api import FunkSVD

        return FunkSVD
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
