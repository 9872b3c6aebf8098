"""MAE pretraining library: models, data pipeline, training loop and the pieces they share."""

__version__ = "0.1.0"
