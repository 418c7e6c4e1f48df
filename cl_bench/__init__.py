"""cl_bench: an experiment runner for continual fine-tuning of pre-trained models."""

__version__ = "0.1.0"
