"""Build here the wheel folder that one device call needs to run bench/gpu.py on a lent GPU machine.

The lent machines (one H100/H200, Python 3.12, no network) already have torch 2.11, lightning,
transformers 5.17, peft, torchmetrics and tensorboard, and lack deepspeed, jsonargparse, litserve and
flash-attn. This writes into .whl/ (git-ignored; the device tool's `carry`):
- our package's wheel;
- DeepSpeed's wheel, built here from its sdist with DS_BUILD_OPS=0 (pure Python: ops are compiled
  just in time, and our runs use none: the optimizer is torch's);
- cp312 / py3 manylinux wheels of every package our dependencies and the `gpu` extra's liger-kernel
  need that the machine's packages do not bring (their versions: the ones installed and tested here);
- not flash-attn-4: its nvidia-cutlass-dsl-libs-cu12 wheel alone is ~92 MB, over the 64 MiB the
  device tool carries, so the GPU runs SDPA (per packed document) and says flash is skipped.

    python bench/gpu_wheels.py            # build .whl/, print its size with the working tree
    python bench/gpu_wheels.py --check    # then install it into a throwaway Python 3.12 venv whose
                                          # torch/transformers/... are stand-ins at the machine's versions

Then, as one device call (docs/BENCHMARKS.md, "GPU checks"): carry [".whl"] and run DEVICE_COMMAND,
    PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install -q --no-index --find-links .whl bumblecore liger-kernel && PYTHONPATH=$PWD python bench/gpu.py --json $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import email
import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
LIMIT_MIB = 64  # what the device tool carries: the working tree and the carried paths together
# On the lent machines (with their own dependencies); versions where they matter.
PRESENT = {"torch": "2.11.0", "transformers": "5.17.0", "lightning": None, "peft": None, "torchmetrics": None,
           "tensorboard": None}  # fmt: skip
# Installed beside torch's CUDA wheels there, never carried: they are GBs.
NEVER = ("torch", "triton", "nvidia-")
DEVICE_COMMAND = (
    "PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install -q --no-index --find-links .whl bumblecore liger-kernel"
    " && PYTHONPATH=$PWD python bench/gpu.py --json $OUT/gpu.json"  # the tree's code; the wheels bring what it needs
)
EXTRA = ["liger-kernel==0.8.5"]  # the gpu extra's wheel that fits (flash-attn-4 does not, see above)
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}  # fmt: skip
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64"]  # fmt: skip


def applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**TARGET, "extra": extra}) for extra in extras or {""})


def closure(roots: list[Requirement]) -> dict[str, str]:
    """name -> version (installed here) of the roots and everything they need on the target."""
    found: dict[str, str] = {}
    pending = [(root, set(root.extras)) for root in roots]
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(extras))
        if key in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} (needed by the GPU run) is not installed here: install it first") from None
        found[key] = dist.version
        for line in dist.requires or []:
            dependency = Requirement(line)
            if applies(dependency, extras | {""}):
                pending.append((dependency, set(dependency.extras)))
    versions = {}
    for (name, _), version in found.items():
        versions[name] = version
    return versions


def our_requirements() -> list[Requirement]:
    """Our wheel's dependencies (not its extras), as the machine's pip will read them."""
    wheel = next(WHEELS.glob("bumblecore-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        fields = email.message_from_bytes(archive.read(name))
    requirements = [Requirement(line) for line in fields.get_all("Requires-Dist") or []]
    return [r for r in requirements if applies(r, set())]


def carried_names() -> dict[str, str]:
    """What the machine lacks: our dependencies' closure minus the present packages' closure."""
    present = closure([Requirement(name) for name in PRESENT])
    needed = closure(our_requirements())
    return {
        name: version
        for name, version in sorted(needed.items())
        if name not in present and not name.startswith(NEVER) and name != "bumblecore"
    }


def pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env={**os.environ, **(env or {})})


def download(requirement: str) -> None:
    platforms = [f"--platform={p}" for p in PLATFORMS]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version=3.12", "--implementation=cp",
        *platforms, "-d", str(WHEELS), requirement, env={"PIP_CONSTRAINT": ""})  # fmt: skip


def build() -> None:
    if WHEELS.exists():
        shutil.rmtree(WHEELS)
    WHEELS.mkdir()
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(WHEELS), str(ROOT))
    carried = carried_names()
    # DeepSpeed publishes an sdist only; built here without ops it is a py3 wheel.
    deepspeed = carried.pop("deepspeed")
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "--no-binary=deepspeed", "-w", str(WHEELS),
        f"deepspeed=={deepspeed}", env={"DS_BUILD_OPS": "0", "PIP_CONSTRAINT": ""})  # fmt: skip
    for name, version in carried.items():
        download(f"{name}=={version}")
    for requirement in EXTRA:
        download(requirement)


def tree_bytes() -> int:
    """The working tree that travels: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())


def report() -> int:
    wheels = sorted(WHEELS.glob("*.whl"))
    for wheel in wheels:
        python_tag, abi = wheel.name.rsplit("-", 3)[1:3]
        fits = python_tag in ("py3", "py2.py3", "cp312") or (abi == "abi3" and int(python_tag[3:]) <= 12)
        assert fits, f"{wheel.name} does not install on CPython 3.12"
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    carried, tree = sum(w.stat().st_size for w in wheels), tree_bytes()
    total = (carried + tree) / 2**20
    print(f"{len(wheels)} wheels {carried / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = {total:.1f} MiB "
          f"(limit {LIMIT_MIB} MiB)")  # fmt: skip
    return 0 if total <= LIMIT_MIB else 1


def stand_in_wheel(folder: Path, name: str, version: str) -> None:
    """An empty wheel named like a present package: lets the check resolve against the machine's set."""
    dist = f"{name.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: gpu_wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")


def check(python312: str) -> None:
    """Install .whl/ with --no-index into a Python 3.12 venv holding stand-ins of the machine's packages
    (the present closure, torch 2.11.0 and transformers 5.17.0): every carried requirement resolves
    from the folder, and the cp312 wheels unpack. (Nothing is imported: the stand-ins are empty.)"""
    if shutil.which(python312) is None:
        raise SystemExit(f"--check needs Python 3.12: {python312} not found (give --python)")
    present = closure([Requirement(name) for name in PRESENT])
    present.update({name: version for name, version in PRESENT.items() if version})
    present["triton"] = "3.6.0"  # torch's CUDA wheel brings its own there; not installed here
    with tempfile.TemporaryDirectory() as tmp:
        stand_ins = Path(tmp) / "present"
        stand_ins.mkdir()
        for name, version in present.items():
            stand_in_wheel(stand_ins, name, version)
        venv = Path(tmp) / "venv"
        subprocess.run([python312, "-m", "venv", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        no_index = ["--no-index", "--find-links", str(WHEELS)]
        env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_FIND_LINKS": "", "PYTHONPATH": ""}
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(stand_ins),
                        *present], check=True, env=env)  # fmt: skip
        subprocess.run([python, "-m", "pip", "install", "-q", *no_index, "bumblecore", "liger-kernel"], check=True,
                       env=env)  # fmt: skip
        listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], check=True, env=env,
                                capture_output=True, text=True).stdout  # fmt: skip
        print(f"installed into a Python 3.12 venv with --no-index: {len(listed.splitlines())} packages, "
              f"torch {present['torch']} and transformers {present['transformers']} stand-ins")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="install the folder into a throwaway 3.12 venv")
    parser.add_argument("--python", default="python3.12", help="the Python 3.12 that --check makes its venv with")
    parser.add_argument("--no_build", action="store_true", help="keep .whl/ as it is (with --check)")
    args = parser.parse_args()
    if not args.no_build:
        build()
    status = report()
    if args.check:
        check(args.python)
    print(f"the device call: carry ['.whl'], run: {DEVICE_COMMAND}")
    sys.exit(status)


if __name__ == "__main__":
    main()
