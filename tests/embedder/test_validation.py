"""Data validation in prepare_data: quarantine, modes, limits, class changes, and S3 (moto server mode)."""

from __future__ import annotations

import io
import json
import shutil

import mlflow
import pytest
from mlflow import MlflowClient
from PIL import Image

from embedder import data
from retrain_contract import storage
from tests.embedder.test_stages import run_stage

MAX_PIXELS = 1_000_000


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def messy_root(digits_root, tmp_path):
    """The digits plus four bad files and one image of every odd mode."""
    root = tmp_path / "messy"
    shutil.copytree(digits_root, root)
    good = next((root / "train" / "one").glob("*.png")).read_bytes()
    bad = {
        "train/one/truncated.png": good[: len(good) // 2],
        "train/two/empty.png": b"",
        "train/three/notes.png": b"meeting notes, not a picture",
        "test/four/huge.png": png(Image.new("L", (1500, 1500), 255)),  # 2.25 M pixels > MAX_PIXELS
    }
    for rel, payload in bad.items():
        (root / rel).write_bytes(payload)
    odd = {"RGBA": "PNG", "LA": "PNG", "P": "PNG", "1": "PNG", "CMYK": "JPEG", "I;16": "TIFF"}
    for mode, fmt in odd.items():
        Image.new(mode, (32, 32)).save(root / "train" / "five" / f"mode-{mode.replace(';', '')}.{fmt.lower()}", fmt)
    return root, bad, odd


def prepare(root, tmp_path, *extra, expect=0):
    return run_stage("prepare_data", "--data-uri", root.as_uri(), "--storage-uri", (tmp_path / "store").as_uri(),
                     "--experiment", "v", "--max-pixels", str(MAX_PIXELS), *extra, tmp_path=tmp_path, expect=expect)


def test_bad_files_are_quarantined_with_reasons_and_odd_modes_converted(messy_root, tmp_path, mlflow_sqlite):
    root, bad, odd = messy_root
    result, _ = prepare(root, tmp_path)
    reasons = {q["path"]: q["reason"] for q in result["quarantined"]}
    assert reasons.keys() == bad.keys()
    assert reasons["train/one/truncated.png"].startswith("not a decodable image")
    assert reasons["train/two/empty.png"] == "empty file (0 bytes)"
    assert reasons["train/three/notes.png"] == ("not a decodable image: not in an image format Pillow can read "
                                                "(cannot identify image file)")
    assert reasons["test/four/huge.png"] == (f"decompression bomb guard: 1500x1500 = 2250000 pixels, "
                                             f"over the limit of {MAX_PIXELS}")
    manifest = data.read_manifest(result["manifest_uri"])
    assert set(odd) <= set(manifest.modes())
    run = MlflowClient().get_run(result["mlflow_run_id"])
    assert run.data.metrics["quarantined_files"] == 4
    report = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/data_report.json")
    assert {q["path"] for q in report["quarantined"]} == bad.keys()

    train, _ = run_stage("train", "--manifest-uri", result["manifest_uri"], "--experiment", "v",
                         "--architecture", "resnet18", "--image-size", "32", "--epochs", "1", "--batch-size", "64",
                         tmp_path=tmp_path)  # training proceeds on the rest, odd modes included
    assert train["dataset_version"] == result["dataset_version"]


def test_too_many_quarantined_files_fail_naming_count_and_limit(messy_root, tmp_path, mlflow_sqlite):
    root, bad, _ = messy_root
    result, err = prepare(root, tmp_path, "--max-quarantine-share", "0.005", expect=2)
    total = sum(1 for p in root.rglob("*") if p.is_file())
    assert f"{len(bad)} of {total} files" in err and "over the limit of 0.5% (--max-quarantine-share)" in err
    assert result is None
    assert not (tmp_path / "store").exists()  # nothing half-written: no manifest for a rejected snapshot
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("v").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]  # the report is still there to read
    assert mlflow.artifacts.load_dict(f"runs:/{runs[0].info.run_id}/data_report.json")["quarantined"]


def test_a_class_with_too_few_images_fails_naming_it(digits_root, tmp_path, mlflow_sqlite):
    root = tmp_path / "data"
    shutil.copytree(digits_root, root)
    for extra in sorted((root / "train" / "six").glob("*.png"))[2:]:
        extra.unlink()
    _, err = prepare(root, tmp_path, "--min-images-per-class", "5", expect=2)
    assert "classes with fewer than 5 training images (--min-images-per-class): 'six' (2)" in err


def test_classes_added_and_removed_since_the_champion_are_reported(digits_root, tmp_path, mlflow_sqlite):
    first, _ = prepare(digits_root, tmp_path)

    class Identity(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Identity(), pip_requirements=[])
    version = mlflow.register_model(info.model_uri, "m", tags={"dataset_version": first["dataset_version"]})
    MlflowClient().set_registered_model_alias("m", "champion", version.version)

    root = tmp_path / "changed"
    shutil.copytree(digits_root, root)
    for split in ("train", "val", "test"):
        shutil.rmtree(root / split / "nine")
        shutil.copytree(root / split / "eight", root / split / "ten")
    second, _ = prepare(root, tmp_path, "--model-name", "m")
    assert second["class_changes"] == {"added": ["ten"], "removed": ["nine"]}
    tags = MlflowClient().get_run(second["mlflow_run_id"]).data.tags
    assert (tags["classes_added"], tags["classes_removed"]) == ("ten", "nine")


def test_s3_data_root_with_pagination_and_transient_errors(s3, messy_root):
    direct, proxy = s3
    root, bad, _ = messy_root
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        direct.put_object(Bucket="images", Key=f"digits/{path.relative_to(root).as_posix()}", Body=path.read_bytes())
    assert len(files) > 3 * 100  # several pages of 100 keys

    on_s3 = data.scan("s3://images/digits", workers=4, max_pixels=MAX_PIXELS)
    local = data.scan(root.as_uri(), max_pixels=MAX_PIXELS)
    assert proxy.injected > 10  # a third of all requests failed once and were retried by boto3
    assert set(proxy.injected_codes) == {"SlowDown", "InternalError", "ServiceUnavailable"}  # throttled or not
    assert proxy.list_pages >= len(files) // 100  # the listing was paginated (100 keys a page here)
    assert on_s3.dataset_version == local.dataset_version
    assert {q.path for q in on_s3.quarantined} == bad.keys()
    storage.write_bytes("s3://images/manifests/m.json", json.dumps({"ok": True}).encode())
    assert json.loads(storage.read_bytes("s3://images/manifests/m.json")) == {"ok": True}
