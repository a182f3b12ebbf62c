"""A mirrored request's source (the ``X-Embedder-Mirror`` header): what the preview compares against."""

from __future__ import annotations

import pytest

from retrain_contract.serving import MirrorSource, Pin


def test_the_header_round_trips_every_field():
    source = MirrorSource("7", 0.0123456789, ("cat", "dog"), "embedder")
    assert MirrorSource.decode(source.encode()) == MirrorSource("7", 0.012346, ("cat", "dog"), "embedder")


def test_a_source_is_the_same_version_only_under_the_same_model_name():
    # A new model name starts again at version 1: its preview must still compare against the old model's version 1.
    source = MirrorSource("1", 0.01, None, "embedder")
    assert source.is_from(Pin("embedder", "1"))
    assert not source.is_from(Pin("embedder-v2", "1"))
    assert not source.is_from(Pin("embedder", "2"))
    # A sender that does not name its model (an older serving process) is judged on the version alone.
    assert MirrorSource("1", 0.01).is_from(Pin("anything", "1"))


@pytest.mark.parametrize("text", ["", "not base64!", "e30="])
def test_a_malformed_header_is_a_clear_error(text):
    with pytest.raises(ValueError, match="X-Embedder-Mirror"):
        MirrorSource.decode(text)
