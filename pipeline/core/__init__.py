"""The ground floor: config, errors and exit codes, executors (in-process and Dask), run directories, logs.
Imports nothing else of ``funkflow.pipeline``."""
