"""funkflow's driver side, one sub-package per concern.

- ``data``: rating sources and their layouts, ingest, the canonical dataset, the DSGD blocks;
- ``training``: the DSGD driver, the worker-to-worker exchange, block placement, checkpoints, tune, plan;
- ``serving``: the model directory, evaluate, predict, recommend, fold-in and the Python API;
- ``running``: the CLI, config, the stages of a run, the run directory, clusters, logs and errors.

What runs on the workers is in ``funkflow.tasks``, which never imports this package.
"""
