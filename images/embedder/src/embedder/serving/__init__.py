"""The serving API, ``python -m embedder.serving``: embeddings and similarity search from the model version
pinned in a desired-state record. One concern per module:

- :mod:`~embedder.serving.cli` (run by ``__main__``): flags and their environment defaults, uvicorn
  start-up and graceful shutdown;
- :mod:`~embedder.serving.app`: ``create_app``, the composition root, and the routes;
- :mod:`~embedder.serving.runtime`: what one app runs (preprocessing pool, micro-batcher, background
  threads) and the path from a request's images to checked embeddings;
- :mod:`~embedder.serving.model`: the model being served, reconciled to the desired-state record,
  warmed up, ready or not;
- :mod:`~embedder.serving.inputs`: request parsing (multipart, JSON/base64), size and pixel limits, the
  body-limit middleware;
- :mod:`~embedder.serving.schemas`: response models, the OpenAPI request body and error responses;
- :mod:`~embedder.serving.metrics`: Prometheus metrics, one registry per app;
- :mod:`~embedder.serving.batching`: micro-batching, concurrent requests sharing one forward pass;
- :mod:`~embedder.serving.sampling`: the sample of served embeddings for the drift monitor.
"""
