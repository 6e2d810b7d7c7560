"""Issue 15, training half: a tokenizer the model cannot embed, runs mixed in one output_dir, non-finite
steps, damaged resume state, undecodable or empty data, and what killed or failed saves leave behind."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import init_tiny_model_dir

import bumblecore
from bumblecore.cli import main
from bumblecore.recipes import recipe_for

DEMO = Path(bumblecore.__file__).parent / "demo_data"
LONG_PROMPT = {"instruction": "word " * 300, "output": "answer"}  # every target beyond cutoff_len 128


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    lines = open(DEMO / "sft_train.jsonl", encoding="utf-8").read().splitlines()[:40]
    (root / "sft.jsonl").write_text(
        "\n".join(lines[:20] + [json.dumps(LONG_PROMPT)] + lines[20:]) + "\n", encoding="utf-8"
    )
    init_tiny_model_dir(str(root / "init"))
    pretrain = root / "pretrain.jsonl"
    pretrain.write_text("".join(open(DEMO / "pretrain.jsonl", encoding="utf-8").readlines()[:16]), encoding="utf-8")
    file = root / "base.yaml"
    file.write_text(
        yaml.safe_dump(
            {
                **config(
                    root,
                    root / "model",
                    training_stage="pretrain",
                    dataset_path=str(pretrain),
                    model_name_or_path=str(root / "init"),
                ),
                "max_steps": 1,
                "save_steps": 0,
            }
        )
    )
    main(["train", "--config", str(file)])  # the model every test starts from: weights, tokenizer
    return root


def config(root, output_dir, **keys):
    return {
        "training_stage": "sft",
        "model_name_or_path": str(root / "model"),
        "dataset_path": str(root / "sft.jsonl"),
        "output_dir": str(output_dir),
        "cutoff_len": 128,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "save_steps": 2,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_model_precision": "fp32",
        "warmup_ratio": 0.0,
        "cache_dir": str(root / "cache"),
        **keys,
    }


def train(root, output_dir, capsys=None, **keys) -> tuple[int, str]:
    """`bumblecore train` in this process: (exit status, stdout + stderr)."""
    file = root / f"{Path(output_dir).name}.yaml"
    file.write_text(yaml.safe_dump(config(root, output_dir, **keys)))
    try:
        main(["train", "--config", str(file)])
        status = 0
    except SystemExit as exit:
        status = exit.code
    out = capsys.readouterr() if capsys else None
    return status, (out.out + out.err if out else "")


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(root):
    """One finished run with checkpoints 2 and 4, its token cache inside its output_dir, prepared beforehand."""
    out = root / "finished"
    file = root / "prepare.yaml"
    file.write_text(yaml.safe_dump(config(root, out, cache_dir=str(out / "token_cache"))))
    main(["prepare_data", "--config", str(file)])  # output_dir now holds only the token cache: still free
    status, _ = train(
        root, out, cache_dir=str(out / "token_cache"), resume_from_checkpoint="latest"
    )  # nothing to resume: fresh
    assert status == 0
    return out


# ---------------------------------------------------------------------------- 3. tokenizer larger than the model


def test_tokenizer_larger_than_the_model_is_refused_before_anything_is_written(root, capsys):
    small = root / "small_vocab"
    shutil.copytree(root / "model", small)
    raw = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**raw, "vocab_size": 128}))
    status, output = train(root, root / "never", capsys, model_name_or_path=str(small))
    assert status == 1 and "vocab_size 128" in output and "ids >= 128 have no embedding" in output
    assert not (root / "never").exists()


# ---------------------------------------------------------------------------- 5. runs mixed in one output_dir


def test_another_run_is_refused_and_the_first_runs_outputs_stay_intact(root, finished, capsys):
    before = snapshot(finished)
    status, output = train(root, finished, capsys, cache_dir=str(finished / "token_cache"), learning_rate=1e-3)
    assert status == 1 and "holds another run's outputs" in output and "learning_rate 0.005 -> 0.001" in output
    assert "overwrite_output_dir: true" in output and "Traceback" not in output
    assert snapshot(finished) == before  # model, metrics, checkpoints, record: byte for byte


def test_the_same_run_again_and_overwrite_output_dir(root, finished, capsys, tmp_path):
    copy = tmp_path / "again"
    shutil.copytree(finished, copy, ignore=shutil.ignore_patterns("token_cache"))
    (copy / "training_args.yaml").write_text(
        (finished / "training_args.yaml").read_text().replace(str(finished), str(copy))
    )
    status, output = train(root, copy, capsys)  # the same config: the same run, started again
    assert status == 0 and "earlier attempt of this run" in output
    # The banner counts what the data lost and says where.
    assert "41 records -> 40 samples" in output and "1 dropped (1 with no trained token within cutoff_len)" in output
    assert f"dropped: {root / 'sft.jsonl'} line 21: has no trained token within cutoff_len 128" in output
    status, output = train(root, copy, capsys, max_steps=2, overwrite_output_dir=True)
    assert status == 0 and "overwrite_output_dir: removed" in output
    assert sorted(p.name for p in copy.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run's checkpoint-4 is gone
    assert [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_checkpoint_of_another_kind_of_run_is_not_resumed(root, finished, capsys, tmp_path):
    shutil.copytree(finished / "checkpoint-4", tmp_path / "out" / "checkpoint-4")
    status, output = train(root, tmp_path / "out", capsys, finetuning_type="lora", resume_from_checkpoint="latest")
    assert (
        status == 1
        and "was saved by a different run" in output
        and "finetuning_type 'full' (this run: 'lora')" in output
    )
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------- 6. non-finite steps


@pytest.mark.slow
def test_divergence_stops_before_the_update_and_nothing_non_finite_is_saved(root, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "diverged"
    file = tmp_path / "diverge.yaml"
    file.write_text(
        yaml.safe_dump(
            config(
                root, out, learning_rate=1e3, max_grad_norm=0, save_steps=1, max_steps=6, lr_scheduler_type="constant"
            )
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "bumblecore", "train", "--config", str(file)], capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if "error:" in line][0]
    step = int(message.split(" at step ")[1].split()[0])
    assert "became nan" in message or "became inf" in message
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved == list(range(1, step))  # every step before the stop, none at or after it
    for directory in out.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(directory / "model.safetensors").values())
        state = torch.load(directory / "training_state", weights_only=False)
        tensors = [v for v in state["optimizer"]["state"].values() for v in v.values() if torch.is_tensor(v)]
        assert tensors and all(torch.isfinite(t).all() for t in tensors)


def test_with_clipping_on_a_non_finite_loss_is_the_same_clear_stop(root, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken_model"
    shutil.copytree(root / "model", broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][0] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    status, output = train(root, tmp_path / "out", capsys, model_name_or_path=str(broken), max_grad_norm=1.0)
    assert status == 1 and "at step 1 " in output and "Traceback" not in output
    assert not list((tmp_path / "out").glob("checkpoint-*"))


# ---------------------------------------------------------------------------- 7. damaged resume state


def flip(file: Path, at: int, size: int = 4096) -> None:
    data = bytearray(file.read_bytes())
    data[at : at + size] = bytes(b ^ 0xFF for b in data[at : at + size])
    file.write_bytes(bytes(data))


def test_damaged_checkpoints_are_named_and_latest_falls_back(root, finished, capsys, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("token_cache"))
    (out / "training_args.yaml").write_text(
        (finished / "training_args.yaml").read_text().replace(str(finished), str(out))
    )
    state = out / "checkpoint-4" / "training_state"
    flip(state, at=state.stat().st_size // 2)
    status, output = train(root, out, capsys, resume_from_checkpoint=str(out / "checkpoint-4"))
    assert status == 1 and "checkpoint-4 is damaged: training_state does not match its checksum" in output
    status, output = train(root, out, capsys, resume_from_checkpoint="latest")
    assert (
        status == 0 and "skipped damaged checkpoint-4" in output and "resumed from" in output and "at step 2" in output
    )
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    reference = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in history] == [r["loss"] for r in reference]  # the fallback resumes exactly
    # Truncated and emptied files are named too; without checksums (an older checkpoint) the load error is one line.
    (out / "checkpoint-2" / "training_state").write_bytes(state.read_bytes()[:1000])
    status, output = train(root, out, capsys, resume_from_checkpoint=str(out / "checkpoint-2"))
    assert status == 1 and "training_state has 1000 bytes" in output
    marker = out / "checkpoint-2" / "trainer_state.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "checksums"}))
    status, output = train(root, out, capsys, resume_from_checkpoint=str(out / "checkpoint-2"))
    assert status == 1 and "training_state cannot be restored" in output and "Traceback" not in output


# ---------------------------------------------------------------------------- 8. undecodable and empty data


@pytest.mark.parametrize(
    "content,expected",
    [
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2: not UTF-8 text (byte 0xe9 at column 14)"),
        (b'[\n {"text": "ok"},\n {"text": "caf\xe9"}\n]\n', "line 3: not UTF-8 text (byte 0xe9"),
        (b"", "the file is empty"),
        (b"[]\n", "the JSON array holds no records"),
        (b"\n\n", "the file holds only blank lines"),
    ],
)
def test_undecodable_and_empty_files_name_file_line_and_reason(root, tmp_path, capsys, content, expected):
    data = tmp_path / ("d.json" if content.lstrip().startswith(b"[") else "d.jsonl")
    data.write_bytes(content)
    file = tmp_path / "p.yaml"
    file.write_text(
        yaml.safe_dump(
            config(
                root,
                tmp_path / "out",
                dataset_path=str(data),
                training_stage="pretrain",
                cache_dir=str(tmp_path / "cache"),
            )
        )
    )
    error = _prepare_error(file, capsys)
    assert str(data) in error and expected in error and "Traceback" not in error


def _prepare_error(file, capsys) -> str:
    with pytest.raises(SystemExit):
        main(["prepare_data", "--config", str(file)])
    return capsys.readouterr().err


def test_a_file_whose_only_record_is_too_long_says_so(root, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(LONG_PROMPT) + "\n")
    file = tmp_path / "p.yaml"
    file.write_text(
        yaml.safe_dump(config(root, tmp_path / "out", dataset_path=str(data), cache_dir=str(tmp_path / "cache")))
    )
    error = _prepare_error(file, capsys)
    assert f"{data}: no usable samples: {data} line 1: has no trained token within cutoff_len 128" in error


# ---------------------------------------------------------------------------- 9. leftovers


def test_checkpoint_files_have_the_usual_mode(finished):
    umask = os.umask(0)
    os.umask(umask)
    for file in [*(finished / "checkpoint-4").rglob("*"), *finished.iterdir()]:
        if file.is_file():
            assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file


def test_a_failed_save_leaves_nothing_and_stale_temporaries_are_cleaned(tmp_path):
    from bumblecore.train.checkpoint import remove_stale_temporaries, save_checkpoint

    def disk_full(tmp_dir):
        (tmp_dir / "model.safetensors").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, "checkpoint-3", disk_full, {"step": 3})
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".checkpoint-5.tmp").mkdir()  # left by a kill -9
    (tmp_path / ".checkpoint-7.old").mkdir()  # killed between a re-save's renames: the whole old one
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".checkpoint-5.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]


def test_cache_build_removes_only_temporaries_of_dead_processes(root, tmp_path):
    from bumblecore.data.cache import build_cache
    from bumblecore.tokenizer import load_tokenizer

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    cache = tmp_path / "cache"
    for name in (f".abc.tmp-{host}-{dead.pid}", f".abc.tmp-{host}-{os.getppid()}", f".abc.tmp-elsewhere-{dead.pid}"):
        (cache / name).mkdir(parents=True)
    build_cache(
        root / "sft.jsonl",
        load_tokenizer(root / "model"),
        recipe_for("sft").reading,
        128,
        cache_dir=cache,
        progress=False,
    )
    left = sorted(p.name for p in cache.iterdir() if p.name.startswith("."))
    assert left == sorted([f".abc.tmp-{host}-{os.getppid()}", f".abc.tmp-elsewhere-{dead.pid}"])
