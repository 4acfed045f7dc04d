"""Training: data sources, dataset preparation, the Medusa objective, the training loop and its checkpoints."""
