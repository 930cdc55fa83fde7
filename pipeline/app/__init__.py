"""The top floor: the CLI, the stages of a run, tune, the report and the Python API (``FunkSVD``). Uses
every floor below; nothing below imports it."""
