"""Running funkflow: the CLI, config, the stages of a run, its directory, clusters, logs and exit codes."""
