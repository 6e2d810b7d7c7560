"""Scale-out on 2 CPU processes: the real DeepSpeed engine (ZeRO-0/1/2/3 over gloo) with the shipped
configs/deepspeed/*.json, under every launcher that runs on CPU (bumblecore --devices, torchrun, the
deepspeed launcher, SLURM srun as it sets the environment, fabric run over two "nodes").

The oracle is one process with the same global batch (accumulation 4; each of the 2 processes
accumulates 2, so DeepSpeed's own accumulation boundary is exercised): final weights agree within
1e-4 in fp32; a resumed run equals the uninterrupted one; the ZeRO-3 consolidated save loads in
transformers; a LoRA adapter trained under ZeRO-3 is complete and equals the plain LoRA run.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import init_tiny_model_dir, tiny_run_keys

from bumblecore.cli import main

pytestmark = pytest.mark.slow  # starts processes, servers or whole pipelines

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "bumblecore" / "demo_data"
ZERO = {stage: str(REPO / "configs" / "deepspeed" / f"ds_z{stage}_config.json") for stage in (0, 1, 2, 3)}
BIN = Path(sys.executable).parent
STEPS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command, cwd, env=None, timeout=300) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, f"{command[:4]}: {result.stderr[-4000:]}"
    return result.stdout + result.stderr


def train_line(config: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(config), "--output_dir", str(output), *extra]


def worst_difference(a_dir: Path, b_dir: Path, file: str = "model.safetensors") -> float:
    a, b = load_file(a_dir / file), load_file(b_dir / file)
    assert sorted(a) == sorted(b), f"{file}: different tensors"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny pretrained base, the run config, and the one-process reference run (accumulation 4)."""
    root = tmp_path_factory.mktemp("scale")
    init_tiny_model_dir(str(root / "init"))
    config = root / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            tiny_run_keys(
                training_stage="continue_pretrain",
                model_name_or_path=str(root / "base"),
                dataset_path=str(DEMO / "pretrain_eval.jsonl"),
                cutoff_len=64,
                max_steps=STEPS,
                gradient_accumulation_steps=2,
                accelerator="cpu",
                save_steps=2,
                save_total_limit=5,
                cache_dir=str(root / "cache"),
            )
        )
    )
    main(
        train_line(
            config,
            root / "base",
            "--training_stage",
            "pretrain",
            "--model_name_or_path",
            str(root / "init"),
            "--max_steps",
            "1",
            "--save_steps",
            "100",
        )
    )
    main(train_line(config, root / "one", "--gradient_accumulation_steps", "4"))
    return root, config


def two_token_chunks(root: Path) -> dict:
    """The environment of ranks whose loss calls the LM head once per 2 target tokens (sitecustomize runs
    at each interpreter's start): ranks whose micro-batches hold 125 and 124 targets then call the head 63
    and 62 times, and a ZeRO-3 head's per-call gathers must still pair up (losses.chunk_starts)."""
    folder = root / "two_token_chunks"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import bumblecore.train.losses as losses\n\nlosses.tokens_per_chunk = lambda lm_head: 2\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_equals_one_process_and_resumes_exactly(job, stage):
    root, config = job
    out = root / f"zero{stage}"
    extra = ["--deepspeed_config_path", ZERO[stage]]
    env = two_token_chunks(root) if stage == 3 else None
    if stage <= 1:  # bumblecore starts the 2 processes itself
        log = run([sys.executable, "-m", "bumblecore", *train_line(config, out, "--devices", "2", *extra)], root)
    elif stage == 2:
        log = run(
            [
                str(BIN / "torchrun"),
                "--nproc_per_node",
                "2",
                "--master_port",
                str(free_port()),
                "-m",
                "bumblecore",
                *train_line(config, out, *extra),
            ],
            root,
        )
    else:
        log = run(
            [
                str(BIN / "deepspeed"),
                "--num_gpus",
                "2",
                "--master_port",
                str(free_port()),
                str(REPO / "bumblecore" / "__main__.py"),
                *train_line(config, out, *extra),
            ],
            root,
            env,
        )
    assert f"CPUDeepSpeedStrategy (ZeRO-{stage})" in log and "processes: 2" in log
    assert worst_difference(root / "one", out) < 1e-4
    records = metrics(out)
    assert len(records) == STEPS
    reference = metrics(root / "one")
    for got, want in zip(records, reference):
        assert math.isfinite(got["grad_norm"]) and got["grad_norm"] > 0  # DeepSpeed's global gradient norm
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert max(r["grad_norm"] for r in reference) > 1.0  # so clipping (max_grad_norm 1) took part
    if stage <= 1:
        return

    resumed = root / f"zero{stage}_resumed"
    run(
        [
            sys.executable,
            "-m",
            "bumblecore",
            *train_line(
                config, resumed, "--devices", "2", *extra, "--resume_from_checkpoint", str(out / "checkpoint-2")
            ),
        ],
        root,
        env,
    )
    assert worst_difference(out, resumed) == 0.0
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in records[2:]]
    if stage == 3:  # the consolidated 16-bit save (fp32 here) is a plain transformers checkpoint
        from transformers import AutoModelForCausalLM

        from bumblecore import Bumblebee

        ids = torch.randint(0, 768, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
            ours = Bumblebee.from_pretrained(root / "one")(ids)
        assert (theirs - ours).abs().max().item() < 1e-3


def test_zero3_pretraining_from_scratch_under_srun(job):
    """srun sets SLURM_* per task and runs the same command in each: the random init is built
    partitioned (DeepSpeed broadcasts rank 0's) and equals one process's."""
    root, config = job
    one, out = root / "pretrain_one", root / "pretrain_zero3"
    common = ["--training_stage", "pretrain", "--model_name_or_path", str(root / "init"), "--save_steps", "100"]
    main(train_line(config, one, *common, "--gradient_accumulation_steps", "4"))
    port = str(free_port())
    tasks = []
    for rank in range(2):
        env = {
            **os.environ,
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NNODES": "1",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODEID": "0",
            "SLURM_JOB_NAME": "bumblecore",
            "SLURM_JOB_ID": "4242",
            "SLURM_NODELIST": "127.0.0.1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        tasks.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bumblecore",
                    *train_line(config, out, *common, "--deepspeed_config_path", ZERO[3]),
                ],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [task.communicate(timeout=300)[0] for task in tasks]
    assert all(task.returncode == 0 for task in tasks), logs[0][-3000:] + logs[1][-3000:]
    assert "started by srun" in logs[0]
    assert worst_difference(one, out) < 1e-4


def test_lora_under_zero3_saves_the_whole_adapter(job):
    root, config = job
    lora = [
        "--finetuning_type",
        "lora",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "8",
        "--lora_dropout",
        "0",
        "--save_steps",
        "100",
    ]
    main(train_line(config, root / "lora_one", *lora, "--gradient_accumulation_steps", "4"))
    run(
        [
            sys.executable,
            "-m",
            "bumblecore",
            *train_line(config, root / "lora_zero3", *lora, "--devices", "2", "--deepspeed_config_path", ZERO[3]),
        ],
        root,
    )
    plain = load_file(root / "lora_one" / "adapter_model.safetensors")
    sharded = load_file(root / "lora_zero3" / "adapter_model.safetensors")
    assert sorted(sharded) == sorted(plain) and all(sharded[k].shape == plain[k].shape for k in plain)
    assert worst_difference(root / "lora_one", root / "lora_zero3", "adapter_model.safetensors") < 1e-4


def test_two_nodes_with_fabric_run_equal_one_process_and_build_their_own_cache(job):
    """Two `fabric run --num-nodes 2 --node-rank R` on this machine; each "node" has its own token
    cache directory, as a node without a shared filesystem would."""
    root, config = job
    out, port = root / "two_nodes", str(free_port())
    nodes = [
        subprocess.Popen(
            [
                str(BIN / "fabric"),
                "run",
                "--accelerator",
                "cpu",
                "--devices",
                "1",
                "--num-nodes",
                "2",
                "--node-rank",
                str(rank),
                "--main-address",
                "127.0.0.1",
                "--main-port",
                port,
                str(REPO / "bumblecore" / "__main__.py"),
                *train_line(config, out, "--cache_dir", str(root / f"node{rank}_cache"), "--save_steps", "100"),
            ],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), logs[0][-3000:] + logs[1][-3000:]
    assert "1 per node x 2 node(s), started by fabric run" in logs[0]
    assert worst_difference(root / "one", out) < 1e-5
    for rank in range(2):
        assert list((root / f"node{rank}_cache").glob("*/meta.json")), f"node {rank} has no token cache of its own"


def test_fabric_run_with_two_devices_shares_the_cores_and_equals_one_process(job):
    """`fabric run --devices 2` gives each rank OMP_NUM_THREADS = all the machine's cores; each rank takes
    its share instead (two ranks with both cores each of a 2-core machine took 3.0x the wall time, docs/BENCHMARKS.md)."""
    from bumblecore.train.runtime import available_cores

    root, config = job
    out = root / "fabric_run_two_devices"
    command = [str(BIN / "fabric"), "run", "--accelerator", "cpu", "--devices", "2", "--main-port", str(free_port())]
    result = subprocess.run(
        [*command, str(REPO / "bumblecore" / "__main__.py"), *train_line(config, out, "--save_steps", "100")],
        cwd=root,
        env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},  # what fabric run writes, no user's
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "2 per node x 1 node(s), started by fabric run" in log and "DDPStrategy" in log
    assert f"{max(1, available_cores() // 2)} intra-op thread(s) each" in log
    assert worst_difference(root / "one", out) < 1e-5


@pytest.mark.parametrize("variables", [{"WORLD_SIZE": "2", "RANK": "1"}, {"OMPI_COMM_WORLD_SIZE": "2"}])
def test_an_unsupported_launcher_is_refused_before_anything_is_written(job, monkeypatch, capsys, variables):
    root, config = job
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        main(train_line(config, root / "refused"))
    error = capsys.readouterr().err
    assert "does not support" in error and "torchrun --nproc_per_node" in error
    assert not (root / "refused").exists()


def test_a_run_that_cannot_fit_is_refused_before_allocating(tmp_path, capsys):
    """72B in fp32 with Adam needs ~1.2 TB per process without ZeRO: the plan refuses it at once."""
    main(
        [
            "init_model",
            "--preset",
            "72B",
            "--tokenizer_path",
            str(DEMO / "tokenizer"),
            "--output_dir",
            str(tmp_path / "big"),
        ]
    )
    with pytest.raises(SystemExit):
        main(
            [
                "train",
                "--training_stage",
                "pretrain",
                "--model_name_or_path",
                str(tmp_path / "big"),
                "--dataset_path",
                str(DEMO / "pretrain_eval.jsonl"),
                "--output_dir",
                str(tmp_path / "out"),
                "--accelerator",
                "cpu",
                "--train_model_precision",
                "fp32",
                "--cache_dir",
                str(tmp_path / "cache"),
            ]
        )
    error = capsys.readouterr().err
    assert "cannot fit" in error and "ZeRO-3" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", [1, 3])
def test_a_non_finite_step_stops_every_rank_before_deepspeed_updates(job, stage):
    """A weight of inf makes step 1's loss non-finite: both ranks stop with the one-line error (no
    rank hangs in a collective) and nothing is saved."""
    import shutil

    from safetensors.torch import save_file

    root, config = job
    broken = root / f"broken{stage}"
    shutil.copytree(root / "base", broken, ignore=shutil.ignore_patterns("checkpoint-*", "metrics.jsonl", "*.png"))
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][0] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = root / f"nonfinite{stage}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bumblecore",
            *train_line(
                config,
                out,
                "--devices",
                "2",
                "--model_name_or_path",
                str(broken),
                "--deepspeed_config_path",
                ZERO[stage],
            ),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert result.returncode != 0
    assert "at step 1 " in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not list(out.glob("checkpoint-*"))
