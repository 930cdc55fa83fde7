"""Using a model: the model directory, evaluation, predict, recommend and fold-in. Imports the core, data and
training floors."""
