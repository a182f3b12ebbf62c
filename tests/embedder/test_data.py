"""Data tests: the demo data set, manifests, dataset versions and bad layouts."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from embedder import data, demo_data
from embedder.stage import StageInputError
from retrain_contract import storage


def test_demo_data_is_an_imagefolder_of_rgb_pngs(digits_root):
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (digits_root / split).iterdir()) == sorted(demo_data.CLASS_NAMES)
    image = next((digits_root / "train" / "seven").glob("*.png"))
    with Image.open(image) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (32, 32))


def test_demo_split_is_stratified_disjoint_and_seeded(digits_root):
    import numpy as np

    labels = np.repeat(np.arange(3), 20)
    a = demo_data.split_indices(labels, 0.15, 0.15, 0, seed=1)
    b = demo_data.split_indices(labels, 0.15, 0.15, 0, seed=1)
    assert a == b
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(60))
    assert [int((labels[a["test"]] == c).sum()) for c in range(3)] == [3, 3, 3]


def test_manifest_lists_every_image_with_label_split_and_hash(digits_root):
    manifest = data.scan(digits_root.as_uri())
    files = sorted(p.relative_to(digits_root).as_posix() for p in digits_root.rglob("*.png"))
    assert sorted(e.path for e in manifest.entries) == files
    entry = next(e for e in manifest.entries if e.path.startswith("test/two/"))
    assert (entry.split, entry.label, len(entry.sha256)) == ("test", "two", 64)
    assert manifest.counts()["train"]["two"] == sum(1 for _ in (digits_root / "train" / "two").iterdir())
    assert not manifest.quarantined


def test_dataset_version_follows_content_not_location(digits_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(digits_root, copy)
    original = data.scan(digits_root.as_uri()).dataset_version
    assert data.scan(copy.as_uri()).dataset_version == original
    victim = next((copy / "train" / "one").glob("*.png"))
    Image.new("RGB", (32, 32), "white").save(victim)
    assert data.scan(copy.as_uri()).dataset_version != original


def test_manifest_round_trips_and_detects_edits(digits_root, tmp_path):
    manifest = data.scan(digits_root.as_uri())
    uri = (tmp_path / "manifest.json").as_uri()
    storage.write_bytes(uri, manifest.to_json().encode())
    assert data.read_manifest(uri).entries == manifest.entries
    storage.write_bytes(uri, manifest.to_json().replace('"label": "one"', '"label": "two"', 1).encode())
    with pytest.raises(StageInputError, match="do not hash to the recorded dataset version"):
        data.read_manifest(uri)


def test_missing_data_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(StageInputError, match=f"data root .*{missing}.*not a directory"):
        data.scan(missing.as_uri())


def test_class_folder_without_images_names_the_folder(digits_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits_root, root)
    (root / "train" / "empty-class").mkdir()
    (root / "train" / "empty-class" / ".keep").write_text("")
    with pytest.raises(StageInputError, match=r"class folder .*train/empty-class has no usable images"):
        data.scan(root.as_uri())


def test_a_file_that_is_not_an_image_is_reported_not_fatal(digits_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits_root, root)
    (root / "train" / "three" / "notes.png").write_text("this is not a PNG")
    (root / "test" / "four" / "empty.jpg").write_bytes(b"")
    manifest = data.scan(root.as_uri())
    reasons = {q.path: q.reason for q in manifest.quarantined}
    assert reasons.keys() == {"train/three/notes.png", "test/four/empty.jpg"}
    assert reasons["train/three/notes.png"].startswith("not a decodable image")
    assert reasons["test/four/empty.jpg"] == "empty file (0 bytes)"
    assert "train/three/notes.png" not in {e.path for e in manifest.entries}


def test_a_non_image_quarantine_reason_says_what_the_file_is_without_an_object_repr(digits_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits_root, root)
    (root / "train" / "three" / "notes.png").write_text("meeting notes, not a picture")
    good = next((root / "train" / "one").glob("*.png")).read_bytes()
    (root / "train" / "one" / "cut.png").write_bytes(good[: len(good) // 2])
    reasons = {q.path: q.reason for q in data.scan(root.as_uri()).quarantined}
    assert reasons["train/three/notes.png"] == (
        "not a decodable image: not in an image format Pillow can read (cannot identify image file)")
    assert reasons["train/one/cut.png"].startswith("not a decodable image: OSError: image file is truncated")
    assert not [r for r in reasons.values() if " object at 0x" in r or "<" in r], reasons


def test_layout_without_test_split_is_rejected(digits_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(digits_root / "train", root / "train")
    with pytest.raises(StageInputError, match="no images under test/"):
        data.scan(root.as_uri())


def test_any_class_names_and_jpeg_files_work(tmp_path):
    for split in ("train", "test"):
        for label, color in (("red apples", "red"), ("Grün", "green")):
            folder = tmp_path / split / label / "nested"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("L" if i else "RGB", (20 + i, 16), color).save(folder / f"{i}.jpg", "JPEG")
    manifest = data.scan(tmp_path.as_uri())
    assert manifest.classes == ["Grün", "red apples"]
    assert len(manifest.entries) == 12


def test_storage_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    uri = (tmp_path / "a" / "b.json").as_uri()
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")
    assert storage.read_bytes(uri) == b"two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def test_unsupported_storage_scheme_is_named():
    with pytest.raises(storage.StorageError, match="unsupported storage scheme 'gs'"):
        storage.parse("gs://bucket/x")
