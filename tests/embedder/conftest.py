from __future__ import annotations

import pytest
import torch

from embedder import model


@pytest.fixture(scope="module")
def loaded() -> model.LoadedModel:
    """A real, untrained ResNet-18 embedder (512-d, 32 px) as the server holds a loaded model version."""
    torch.manual_seed(0)
    net = model.build("resnet18", 3)
    net.eval()
    return model.LoadedModel(uri="models:/m/1", embedder=net.embedder, head_weight=torch.eye(3, 512),
                             head_scale=16.0, metadata={"image_size": 32, "embedding_dim": 512,
                                                        "classes": ["a", "b", "c"]})
