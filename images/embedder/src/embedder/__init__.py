"""The image embedder: pipeline stages (``python -m embedder.<stage>``) and the serving API."""

__version__ = "0.1.0"
