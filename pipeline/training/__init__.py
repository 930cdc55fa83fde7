"""Training: the DSGD driver, the worker-to-worker exchange of item blocks, block placement, checkpoints,
tuning and cluster sizing."""
