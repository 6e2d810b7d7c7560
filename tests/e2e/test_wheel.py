"""A built wheel runs the main job: `bumblecore demo --quick` from an installed wheel, outside the repository.

The wheel is built from a copy of the package (so the repository gets no build/ or egg-info), installed
with its console script into a fresh virtualenv that reuses this environment's dependencies through a
.pth file (nothing is downloaded, and the repository's editable install is not on the path), and run
from an empty directory: everything the demo reads must be package data."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts processes, servers or whole pipelines

ROOT = Path(__file__).resolve().parents[2]


def can_build_wheels_here() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(part) for part in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    if (major, minor) >= (70, 1):
        return True
    try:
        return major >= 64 and bool(version("wheel"))
    except PackageNotFoundError:
        return False


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "bumblecore", source / "bumblecore", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # Offline with this environment's setuptools when it can build wheels by itself (>= 70.1, or with the
    # wheel package); else pip fetches pyproject's build requirements into an isolated build env.
    offline = ["--no-build-isolation", "--no-index"] if can_build_wheels_here() else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", *offline, "-q", "-w", str(tmp_path / "dist")],
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("bumblecore-*.whl")
    return wheel


def test_installed_wheel_runs_the_quick_demo_outside_the_repository(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"bumblecore/demo_configs/{stage}.yaml" for stage in ("pretrain", "sft", "dpo")} <= names
    assert "bumblecore/demo_data/tokenizer/tokenizer.json" in names and "bumblecore/inference/web/index.html" in names
    assert {
        f"bumblecore/inference/eval_tasks/{name}"
        for name in ("__init__.py", "demo_qa_choice.yaml", "demo_qa_exact.yaml")
    } <= names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # A plain path entry: the dependencies (and pip) are found, the editable install's finder is not loaded.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, timeout=300
    )

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    located = subprocess.run(
        [str(python), "-c", "import bumblecore; print(bumblecore.__file__)"],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(located).is_relative_to(site), located
    # One thread: the quick demo's model is tiny, and on a shared 2-core machine extra threads only wait.
    result = subprocess.run(
        [str(venv / "bin" / "bumblecore"), "demo", "--quick", "true"],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "BumbleCore demo: summary" in result.stdout
    assert (cwd / "checkpoints" / "demo" / "demo_report.json").is_file()
    assert (cwd / "checkpoints" / "demo" / "dpo_merged" / "model.safetensors").is_file()
