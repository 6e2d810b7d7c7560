"""The scripts chain as the tutorial does: pretrain.sh -> sft_full.sh -> dpo_lora.sh -> merge_lora.sh ->
chat.sh / serve.sh, each reading the previous step's default output (no paths passed); and the original's
tools/run_merge_lora.sh. (tests/e2e/test_scripts.py checks that every script's default input is another's output.)

The real shell scripts run in a temporary copy of scripts/, configs/ and tools/ (they cd to the copy's
root, so every checkpoints/ path lands in tmp, never in the repository's), with a tiny model placed at
the start of the chain and flags for a few steps each."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = pytest.mark.slow  # starts processes, servers or whole pipelines

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--preset",
    "0.5B",
    "--num_hidden_layers",
    "2",
    "--hidden_size",
    "64",
    "--intermediate_size",
    "128",
    "--num_attention_heads",
    "4",
    "--num_key_value_heads",
    "2",
    "--vocab_size",
    "768",
    "--torch_dtype",
    "float32",
]
# A few CPU steps on short rows; every other key is the shipped config's.
FEW_STEPS = [
    "--max_steps",
    "2",
    "--save_steps",
    "2",
    "--eval_steps",
    "2",
    "--cutoff_len",
    "64",
    "--train_model_precision",
    "fp32",
    "--train_micro_batch_size_per_gpu",
    "4",
    "--gradient_accumulation_steps",
    "1",
]
LORA = ["--lora_rank", "4", "--lora_alpha", "8"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("workflow")
    for name in ("scripts", "configs", "tools"):
        shutil.copytree(ROOT / name, work / name)
    (work / "bumblecore").symlink_to(ROOT / "bumblecore")  # the configs' bumblecore/demo_data paths
    return work


@pytest.fixture(scope="module")
def env(workdir):
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "BUMBLECORE_CACHE": str(workdir / "cache"),
        # One thread: a tiny model gains nothing from more, and on a shared 2-core machine more
        # threads than free cores made each step 5x slower.
        "OMP_NUM_THREADS": "1",
    }


def run(workdir, env, *command, input=None):
    result = subprocess.run(command, cwd=workdir, env=env, input=input, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def chain(workdir, env):
    """The tutorial's chain with the scripts' default paths; returns the checkpoints dir."""
    run(
        workdir,
        env,
        "bumblecore",
        "init_model",
        *TINY,
        "--tokenizer_path",
        "bumblecore/demo_data/tokenizer",
        "--output_dir",
        "checkpoints/init",
    )
    run(workdir, env, "bash", "scripts/pretrain.sh", *FEW_STEPS)
    run(workdir, env, "bash", "scripts/sft_full.sh", *FEW_STEPS)
    run(workdir, env, "bash", "scripts/dpo_lora.sh", *FEW_STEPS, *LORA)
    run(workdir, env, "bash", "scripts/merge_lora.sh")
    return workdir / "checkpoints"


def test_the_scripts_chain_end_to_end(chain):
    for stage in ("pretrain", "sft_full", "dpo_merged"):
        assert (chain / stage / "model.safetensors").is_file(), stage
    for stage, previous in (("pretrain", "init"), ("sft_full", "pretrain"), ("dpo_lora", "sft_full")):
        resolved = yaml.safe_load((chain / stage / "training_args.yaml").read_text())
        assert Path(resolved["model_name_or_path"]) == Path("checkpoints") / previous, stage
    adapter = json.loads((chain / "dpo_lora" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).name == "sft_full"


def test_chat_script_talks_to_the_merged_model(chain, workdir, env):
    result = run(
        workdir,
        env,
        "bash",
        "scripts/chat.sh",
        "--max_new_tokens",
        "4",
        input="How many words are in: fox owl cup\n/clear\n/exit\n",
    )
    assert "(history cleared)" in result.stdout, (
        result.stdout + result.stderr
    )  # one turn answered, then the next command read


def test_serve_script_answers_one_request(chain, workdir, env):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        ["bash", "scripts/serve.sh", "--port", str(port), "--max_batch_size", "2"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "serve.sh did not come up"
            time.sleep(0.5)
        reply = requests.post(
            url + "/v1/chat/completions",
            timeout=60,
            json={
                "model": "bumblebee",
                "messages": [{"role": "user", "content": "Hello!"}],
                "max_tokens": 4,
                "temperature": 0,
            },
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the script, the server and its workers
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_original_merge_script_takes_its_flags(workdir, env):
    """tools/run_merge_lora.sh with the original's flag set resolves to merge_lora's arguments."""
    result = run(
        workdir,
        env,
        "bash",
        "tools/run_merge_lora.sh",
        "--base_model_path",
        "checkpoints/sft_full",
        "--lora_model_path",
        "checkpoints/dpo_lora",
        "--save_path",
        "checkpoints/aligned",
        "--dtype",
        "auto",
        "--device_map",
        "auto",
        "--trust_remote_code",
        "--low_cpu_mem_usage",
        "--print_config",
    )
    resolved = yaml.safe_load(result.stdout)
    assert (
        resolved["base_model_path"] == "checkpoints/sft_full" and resolved["lora_model_path"] == "checkpoints/dpo_lora"
    )
    assert (
        resolved["save_path"] == "checkpoints/aligned"
        and resolved["dtype"] == "auto"
        and resolved["trust_remote_code"] is True
    )
    defaults = yaml.safe_load(run(workdir, env, "bash", "tools/run_merge_lora.sh", "--print_config").stdout)
    assert (defaults["base_model_path"], defaults["lora_model_path"], defaults["save_path"]) == (
        "checkpoints/sft_full",
        "checkpoints/dpo_lora",
        "checkpoints/dpo_merged",
    )
