"""The architecture's import rules, as code (README, Layout).

- The control plane (``retrain``, imported by Airflow) never imports torch or the model package.
- The model package (``embedder``, in the trainer and server images) never imports Airflow or ``retrain``.
- The contract (``retrain_contract``, installed on both sides) needs nothing but the standard library
  (boto3 only for ``s3://`` storage).

The first two are ``import-linter`` contracts in pyproject.toml; a mutation test shows they bite.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
SOURCES = {"retrain": REPO / "images/airflow/src/retrain", "embedder": REPO / "images/embedder/src/embedder",
           "retrain_contract": REPO / "images/contract/src/retrain_contract", "localdev": REPO / "localdev"}


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout


def test_a_forbidden_import_breaks_its_contract(tmp_path):
    """Mutation: the control plane's drift monitor importing the model package, in a copy of the tree."""
    src = tmp_path / "src"
    for name, path in SOURCES.items():
        shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    monitor = src / "retrain" / "monitor.py"
    monitor.write_text(monitor.read_text() + "\nfrom embedder import storage as _reaching_in  # noqa: E402\n")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    proc = lint_imports(tmp_path, pythonpath=src)
    assert proc.returncode != 0
    assert "the control plane (Airflow's side) never imports torch or the model package BROKEN" in proc.stdout
    assert "retrain.monitor -> embedder" in proc.stdout


def test_the_contract_needs_nothing_but_the_standard_library():
    graph = grimp.build_graph("retrain_contract", include_external_packages=True)
    imported = {imported.split(".")[0] for module in graph.modules if module.startswith("retrain_contract")
                for imported in graph.find_modules_directly_imported_by(module)}
    outside = imported - set(sys.stdlib_module_names) - {"retrain_contract", "__future__"}
    assert outside <= {"boto3", "botocore"}, outside  # boto3 only inside the s3:// functions of storage
