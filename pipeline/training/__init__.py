"""Training: the DSGD driver, the worker-to-worker exchange of item blocks, block placement, checkpoints and
cluster sizing. Imports only the core and data floors."""
