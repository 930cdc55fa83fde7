"""funkflow's driver side: config, stages, the DSGD driver, cluster set-up, the CLI and the Python API."""
