"""The GPU benchmark's arithmetic and its whole run at tiny sizes on the CPU (no GPU here): what it computes,
what it prints, and that it needs nothing a bare GPU machine lacks."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from PIL import Image

from embedder import bench_gpu


def test_training_flops_of_resnet50_at_224_px_are_three_forward_passes_of_4_09_gmacs():
    """torchvision documents ResNet-50 at 224 px as 4.09 GFLOPS (multiply-adds): 8.18 GFLOPs forward."""
    assert bench_gpu.training_flops_per_image("resnet50", 224, 1000) == pytest.approx(3 * 2 * 4.09e9, rel=0.01)


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L4", 121),
    ("NVIDIA L40S", 362), ("NVIDIA A10", 125), ("NVIDIA A10G", None), ("Tesla T4", None),
])
def test_the_peak_table_knows_gpus_by_the_name_cuda_reports(name, peak):
    assert bench_gpu.peak_tflops(name) == peak


def test_the_benchmark_computes_its_table_on_the_cpu_at_tiny_sizes(tmp_path, capsys):
    jpegs = tmp_path / "jpegs"
    report = bench_gpu.main(["--device", "cpu", "--architecture", "resnet18", "--image-size", "32", "--batch-size", "4",
                             "--images", "24", "--classes", "3", "--jpeg-size", "64x48", "--rounds", "1",
                             "--num-workers", "0", "--threads", "1", "--peak-tflops", "0.5", "--data", str(jpegs)])
    out = capsys.readouterr().out

    files = sorted(jpegs.rglob("*.jpg"))
    assert len(files) == 24 + 3
    with Image.open(files[0]) as img:
        assert (img.format, img.size, img.mode) == ("JPEG", (64, 48), "RGB")
    assert report.flops_per_image == bench_gpu.training_flops_per_image("resnet18", 32, 3) > 0
    assert min(report.stage, report.bare, report.pipeline) > 0
    assert report.mfu(report.stage) == pytest.approx(report.stage * report.flops_per_image / 0.5e12)
    # Each row prints its images/s, its share of the bare loop's and, for the two training sides, the MFU.
    rows = {m.group(1).strip(): [float(v) for v in m.group(2, 3)] + [m.group(4)] for m in
            re.finditer(r"^(train stage.*?|bare loop.*?|input pipeline.*?)\s+([\d.]+)\s+([\d.]+)\s+(\S+)$", out, re.M)}
    stage_row = rows["train stage (JPEG files -> step)"]
    assert stage_row[:2] == pytest.approx([report.stage, report.stage / report.bare], abs=0.051)
    assert stage_row[2] == f"{100 * report.mfu(report.stage):.1f}%"
    assert rows["bare loop (tensors on the device)"][1:] == [1.0, f"{100 * report.mfu(report.bare):.1f}%"]
    assert rows["input pipeline alone (to the device)"][1:] == [round(report.pipeline / report.bare, 3), "-"]
    assert "resnet18 @ 32 px, batch 4, CPU (0.5 TFLOPS bf16 dense); float32, channels_last off, torch.compile off" in out
    assert f"stage / bare {report.stage / report.bare:.3f}" in out


def test_the_benchmark_imports_nothing_a_bare_gpu_machine_lacks():
    code = ("import sys, embedder.bench_gpu; "
            "print(sorted(m for m in ('mlflow', 'boto3', 'airflow', 'retrain', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "[]"
