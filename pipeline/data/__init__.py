"""Rating data: sources and their layouts, ingest to a canonical dataset, synthetic data, the DSGD blocks.
Imports only the core floor."""
