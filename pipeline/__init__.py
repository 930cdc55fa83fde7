"""funkflow's driver side: config, stages, the DSGD driver, cluster set-up and the CLI."""
