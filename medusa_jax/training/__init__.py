"""Medusa head training: data pipeline, losses and the training loop."""
