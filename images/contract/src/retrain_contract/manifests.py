"""Dataset manifests, as far as a reader other than the stages needs them.

``prepare_data`` writes a manifest (``embedder.data.Manifest``): every usable file of a data root with its
split, label, size and sha256. The deploy step reads one split of it to replay held-out images to a
preview whose live traffic falls short (:mod:`retrain.rollout.analysis`).
"""

from __future__ import annotations

import json

FORMAT = 1


def split_files(text: str, split: str) -> tuple[str, list[tuple[str, str]]]:
    """The data root and ``(path, label)`` of each file of one ``split`` (paths relative to the root), in order."""
    doc = json.loads(text)
    if doc.get("format") != FORMAT:
        raise ValueError(f"manifest format {doc.get('format')!r}, expected {FORMAT}")
    return doc["data_uri"], [(e["path"], e["label"]) for e in doc["entries"] if e["split"] == split]
