"""Using a model: the model directory, evaluation, predict, recommend, fold-in and the Python API."""
