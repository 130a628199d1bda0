"""vpipe: offline video feature extraction and dataset preprocessing."""

__version__ = "0.1.0"
