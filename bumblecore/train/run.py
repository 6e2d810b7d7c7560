"""`bumblecore train`: setup (Fabric, launch) -> main (model, data, optimiser) -> Engine.fit -> export."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from bumblecore.args import TrainArgs, flat_defaults
from bumblecore.data.dataset_spec import data_sources


def train(run: TrainArgs) -> None:
    """Train a model: pretrain, continue_pretrain, sft, dpo, kto or grpo; full fine-tuning or LoRA.

    Takes the original's flat YAML keys (`--config F` or `--yaml_config F`), each overridable on the
    command line. `devices: N` starts N processes; under a launcher (`fabric run`, `torchrun`,
    `deepspeed`, SLURM `srun`) the processes, world size and nodes are the launcher's.
    """
    from bumblecore.train.runtime import (
        build_fabric,
        detect_launch,
        fill_deepspeed_config,
        launch_processes,
        load_deepspeed_config,
    )

    _check_inputs(run)
    scale, optimization = run.runtime, run.optimization
    launch = detect_launch(scale.devices, scale.num_nodes, scale.accelerator)
    deepspeed = None
    if scale.deepspeed_config_path:
        from bumblecore.train.memory import Workload

        raw = json.loads((Path(run.model.model_name_or_path) / "config.json").read_text())
        hidden = raw.get("hidden_size", 0)
        deepspeed = fill_deepspeed_config(
            load_deepspeed_config(scale.deepspeed_config_path),
            micro_batch_size=optimization.train_micro_batch_size_per_gpu,
            gradient_accumulation_steps=optimization.gradient_accumulation_steps,
            world_size=launch.world_size,
            precision=optimization.train_model_precision,
            max_grad_norm=optimization.max_grad_norm,
            hidden_size=hidden,
            layer_params=Workload.from_config(raw, 1, 1).layer_params or None,
        )
    fabric = build_fabric(
        scale.accelerator, scale.devices, scale.num_nodes, optimization.train_model_precision, deepspeed, launch=launch
    )
    launch_processes(fabric, launch)
    main(fabric, run, deepspeed_config=deepspeed, launcher=launch.launcher)


def to_yaml(run: TrainArgs) -> str:
    """The run's flat keys, as training_args.yaml holds them (and `--config` reads them back)."""
    import yaml

    return yaml.safe_dump(run.flat(), sort_keys=False, allow_unicode=True)


def _check_inputs(run: TrainArgs) -> None:
    if not run.model.model_name_or_path:
        raise ValueError("model_name_or_path is required")
    if not (Path(run.model.model_name_or_path) / "config.json").is_file():
        raise FileNotFoundError(
            f"model_name_or_path {run.model.model_name_or_path}: no config.json (expected a model directory)"
        )
    if not run.data.dataset_path:
        raise ValueError("dataset_path is required")
    if run.model.training_stage == "grpo":
        _check_grpo(run)
    if run.optimization.lr_scheduler_type == "reduce_on_plateau" and not run.data.eval_dataset_path:
        # It steps on the eval loss only: without an eval set the lr would silently stay constant.
        raise ValueError(
            "lr_scheduler_type reduce_on_plateau lowers the lr when the eval loss stops improving, "
            "so it needs eval_dataset_path; give one, or choose another schedule (e.g. cosine)"
        )


def _check_grpo(run: TrainArgs) -> None:
    if run.runtime.deepspeed_config_path and load_zero_stage(run.runtime.deepspeed_config_path) == 3:
        raise ValueError(
            "training_stage grpo with ZeRO-3: the rollouts decode with whole weights on every process; "
            "use ZeRO-0/1/2 or DDP"
        )


def load_zero_stage(path) -> int:
    from bumblecore.train.runtime import load_deepspeed_config

    return int(load_deepspeed_config(path).get("zero_optimization", {}).get("stage", 0))


def config_notes(run: TrainArgs) -> list[str]:
    """Keys that are accepted but change nothing, said once at start rather than silently ignored."""
    notes = []
    if run.data.num_local_io_workers is not None:
        notes.append(
            f"num_local_io_workers {run.data.num_local_io_workers} is accepted and ignored: the Rust tokenizer "
            "already tokenizes the cache on every core, and batches are read in-process from the "
            "memory-mapped cache (no loader workers)"
        )
    if run.model.training_stage == "dpo" and run.preference.reference_free:
        if run.preference.precompute_ref_log_probs is not None:
            notes.append(
                f"precompute_ref_log_probs {run.preference.precompute_ref_log_probs} is ignored: pref_loss "
                f"{run.preference.pref_loss} uses no reference model"
            )
        if run.preference.pref_loss == "simpo" and run.preference.pref_beta < 1.0:
            notes.append(
                f"pref_beta {run.preference.pref_beta} is SimPO's beta here; SimPO's papers use ~2.0 "
                "(0.1 is DPO's default, kept as the key's default)"
            )
    return notes


# ---------------------------------------------------------------------------- model


def _is_bumblebee(model_dir) -> bool:
    """Bumblebee trains the model (its family, every feature expressed); else the transformers fallback."""
    from bumblecore.model.hf_io import bumblebee_expresses

    return bumblebee_expresses(model_dir)


def load_model(
    run: TrainArgs, fabric, dtype: torch.dtype = torch.float32, partitioned: bool = False, vocab_size: int = 0
):
    """Bumblebee for our configs, Qwen2 and Llama; any other causal LM through transformers.

    Pretrained weights are read tensor by tensor straight into `dtype` on the run's device.
    `partitioned` (ZeRO-3): the model is built under DeepSpeed's ZeRO-3 init, so each rank only ever
    holds its slice of every weight, and the checkpoint is scattered into those slices.
    `vocab_size` (resize_vocab): at least this many embedding rows, new ones the mean of the old."""
    from bumblecore.model.bumblebee import Bumblebee
    from bumblecore.model.hf_io import load_pretrained, read_config
    from bumblecore.model.vocab import grow_vocab, load_grown_into_partitioned

    if _is_bumblebee(run.model.model_name_or_path):
        model_config = read_config(run.model.model_name_or_path)
        grows = vocab_size > model_config.vocab_size
        built = dataclasses.replace(model_config, vocab_size=vocab_size) if grows else model_config
        if run.model.training_stage == "pretrain":  # from scratch: every row random, the new ones too
            with fabric.init_module(empty_init=True) if partitioned else contextlib.nullcontext():
                torch.manual_seed(
                    run.optimization.seed
                )  # the same random init on every rank (ZeRO-3: DeepSpeed broadcasts rank 0's)
                model = Bumblebee(built)
        elif partitioned:
            from bumblecore.train.backend import load_into_partitioned

            with torch.random.fork_rng(), fabric.init_module(empty_init=True):  # draws nothing, like a load
                model = Bumblebee(built)
            load = load_grown_into_partitioned if grows else load_into_partitioned
            load(model, run.model.model_name_or_path, fabric.is_global_zero)
        else:
            model = load_pretrained(run.model.model_name_or_path, dtype=dtype, device=fabric.device)
            grow_vocab(model, vocab_size)
        if run.optimization.enable_gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        return model
    model = load_transformers_model(
        run.model.model_name_or_path,
        from_scratch=run.model.training_stage == "pretrain",
        trust_remote_code=run.model.trust_remote_code,
        seed=run.optimization.seed,
        gradient_checkpointing=run.optimization.enable_gradient_checkpointing,
    )
    grow_vocab(model, vocab_size)
    return model


def load_transformers_model(
    model_dir: str,
    from_scratch: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    gradient_checkpointing: bool = False,
):
    """A transformers family for training: its weights from model_dir, or (from_scratch, pretraining) a
    random init from its config.json, seeded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bumblecore.model.transformers_family import TransformersCausalLM
    from bumblecore.train.losses import check_loss_parity

    if from_scratch:
        hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    wrapped = TransformersCausalLM(model)
    check_loss_parity(wrapped)
    if gradient_checkpointing:
        wrapped.set_gradient_checkpointing(True)
    return wrapped


def count_parameters(run: TrainArgs) -> tuple[int, int]:
    """(all, trainable) parameters of the run's model, counted on the meta device (nothing allocated)."""
    from bumblecore.model.lora import linear_layer_names

    if _is_bumblebee(run.model.model_name_or_path):
        from bumblecore.model.bumblebee import Bumblebee
        from bumblecore.model.hf_io import read_config

        with torch.device("meta"):
            model = Bumblebee(read_config(run.model.model_name_or_path))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.from_pretrained(
            run.model.model_name_or_path, trust_remote_code=run.model.trust_remote_code
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=run.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    if run.model.finetuning_type != "lora":
        return total, total
    targets = set(run.lora.lora_target_modules or linear_layer_names(model))
    adapters = sum(
        run.lora.lora_rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    return total + adapters, adapters


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay for biases and norm weights (1-D tensors; ZeRO-3 keeps a
    partitioned weight's real shape in ds_shape)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if len(getattr(p, "ds_shape", p.shape)) < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_once(fabric, build):
    """`build()` run first by global rank 0 (say, tokenizing into the token cache), then by the first
    rank of every other node, then by everyone else. On a shared filesystem the later calls find what
    rank 0 built; a node without one builds its own copy once instead of failing."""
    result = None
    if fabric.global_rank == 0:
        result = build()
    fabric.barrier()
    if fabric.local_rank == 0 and fabric.global_rank != 0:
        result = build()
    fabric.barrier()
    if fabric.local_rank != 0:
        result = build()
    return result


def _processes_per_node(fabric) -> int:
    return max(1, fabric.world_size // getattr(fabric.strategy, "num_nodes", 1))


def memory_plan(
    fabric,
    run: TrainArgs,
    deepspeed_config,
    local_processes: int,
    sequence_length: Optional[int] = None,
    runtime: Optional[int] = None,
    prompt_release: bool = False,
):
    """The per-rank memory plan. `sequence_length`: the rows' length where the data is known (default
    cutoff_len, the bound); `runtime`: the process's own RSS as measured before the model was built;
    `prompt_release`: freed blocks go back to the OS at once (RuntimeArgs.release_freed_memory)."""
    from bumblecore.train.memory import Workload, available_memory, plan_memory, runtime_rss

    total, trainable = count_parameters(run)
    frozen_copy = 0
    if run.model.training_stage == "grpo" and run.grpo.beta and run.model.finetuning_type == "full":
        frozen_copy = total
    elif (
        run.model.training_stage in ("dpo", "kto")
        and not run.preference.reference_free
        and (
            run.preference.ref_model_path
            or (run.model.finetuning_type == "full" and run.preference.precompute_ref_log_probs is False)
        )
    ):
        frozen_copy = total - (trainable if run.model.finetuning_type == "lora" else 0)
    name, available = available_memory(fabric.device, local_processes)
    optimization = run.optimization
    raw = json.loads((Path(run.model.model_name_or_path) / "config.json").read_text(encoding="utf-8"))
    rows = 2 if run.model.training_stage in ("dpo", "kto") else 1  # a preference pair: chosen and rejected rows
    workload = Workload.from_config(
        raw,
        micro_batch_size=optimization.train_micro_batch_size_per_gpu * rows,
        sequence_length=sequence_length or run.data.cutoff_len,
        gradient_checkpointing=bool(optimization.enable_gradient_checkpointing),
        lora_dropout=run.model.finetuning_type == "lora" and bool(run.lora.lora_dropout),
    )
    return plan_memory(
        total,
        trainable,
        optimization.train_model_precision,
        fabric.world_size,
        deepspeed_config,
        name,
        available,
        frozen_copy,
        workload=workload,
        # the host process shares the device on CPU
        runtime=(runtime if runtime is not None else runtime_rss()) if fabric.device.type == "cpu" else 0,
        prompt_release=prompt_release,
    )


# ---------------------------------------------------------------------------- output_dir

# Keys that may change between attempts of one run without making it another run (how it is launched,
# logged and checkpointed, where caches live); every other key of training_args.yaml names the run.
OPERATIONAL_KEYS = frozenset(
    {
        "output_dir",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        # how many processes ran it and on what: the same config launched by `--devices 2`, torchrun or
        # `fabric run` is the same run (docs/TUTORIAL.md re-runs one config under several launchers)
        "devices",
        "num_nodes",
        "accelerator",
        "local_rank",
        "release_freed_memory",  # how memory is handed back, not what is computed
        "num_local_io_workers",
        "cache_dir",
        "logging_steps",
        "save_train_log",
        "use_tensorboard",
        "tokenizer_use_fast",
        "save_steps",
        "save_total_limit",
        "save_last",
        "eval_steps",
        "eval_at_end",
    }
)
PATH_KEYS = ("model_name_or_path", "ref_model_path", "deepspeed_config_path")
DATA_KEYS = ("dataset_path", "eval_dataset_path")
MODEL_SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
RUN_RECORD = "training_args.yaml"


def _resolved(path):
    return str(Path(path).expanduser().resolve()) if isinstance(path, str) and path else path


def _data_meaning(value):
    """A data key's value as what it means: one path is one path whether written as a string or a
    one-element list, relative or absolute; a mapping entry's bare path is {path}, with weights 1.0."""
    if isinstance(value, (list, tuple)):
        paths = [_resolved(v) for v in value]
        return paths[0] if len(paths) == 1 else paths
    if isinstance(value, dict):  # a mixture: {name: path or {path, weight, loss_weight}}
        meaning = {}
        for name, spec in value.items():
            spec = dict(spec) if isinstance(spec, dict) else {"path": spec}
            spec["path"] = _data_meaning(spec.get("path"))
            meaning[str(name)] = {"weight": 1.0, "loss_weight": 1.0, **spec}
        return meaning
    return _resolved(value)


def _meaning(name: str, value):
    if name in PATH_KEYS:
        return _resolved(value)
    if name in DATA_KEYS:
        return _data_meaning(value)
    if name == "new_special_tokens":  # a list or one comma-separated string
        from bumblecore.data.chat_templates import parse_special_tokens

        try:
            return parse_special_tokens(value)
        except ValueError:
            return value
    if name == "lora_target_modules" and isinstance(value, list):  # a set of layer names
        return sorted(value)
    if name == "chat_template" and isinstance(value, str) and value.endswith(".jinja"):
        return _resolved(value)
    return value


def run_identity(values: dict) -> dict:
    """What makes two configurations the same run: every key but the operational ones, each compared
    by what it means (paths resolved, one path as a string or a one-element list alike)."""
    return {
        name: _meaning(name, values.get(name, default))
        for name, default in flat_defaults().items()
        if name not in OPERATIONAL_KEYS
    }


def identity_differences(previous: dict, current: dict) -> list[str]:
    """The keys whose meaning differs between two flat configurations, as `key old -> new`."""
    before, now = run_identity(previous), run_identity(current)
    return [f"{k} {before[k]!r} -> {now[k]!r}" for k in now if before.get(k) != now[k]]


def checkpoint_identity(run: TrainArgs) -> dict:
    """Recorded in every checkpoint and compared on resume: a checkpoint continues only the kind of run that wrote it."""
    raw = json.loads((Path(run.model.model_name_or_path) / "config.json").read_text(encoding="utf-8"))
    raw = {**raw.get("text_config", {}), **raw}
    identity = {
        "training_stage": run.model.training_stage,
        "finetuning_type": run.model.finetuning_type,
        "model_shape": {k: raw[k] for k in MODEL_SHAPE_KEYS if k in raw},
    }
    if run.model.finetuning_type == "lora":
        identity["lora"] = {"rank": run.lora.lora_rank, "target_modules": sorted(run.lora.lora_target_modules or [])}
    return identity


def check_checkpoint_matches(checkpoint_dir: Path, run: TrainArgs) -> None:
    """A resumed checkpoint must come from a run of this stage, model shape and fine-tuning type."""
    from bumblecore.train.checkpoint import read_trainer_state

    saved, wanted = read_trainer_state(checkpoint_dir), checkpoint_identity(run)
    differences = []
    for key, value in wanted.items():
        if key not in saved:  # an older checkpoint records less
            continue
        if isinstance(value, dict):
            differences += [
                f"{key}.{k} {saved[key].get(k)!r} (this run: {v!r})"
                for k, v in value.items()
                if isinstance(saved[key], dict) and k in saved[key] and saved[key][k] != v
            ]
        elif saved[key] != value:
            differences.append(f"{key} {saved[key]!r} (this run: {value!r})")
    if differences:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint_dir} was saved by a different run: "
            f"{'; '.join(differences)}. Resume it with the config that wrote it, or start afresh "
            "in another output_dir"
        )
    if run.model.finetuning_type == "lora":  # the adapter goes on model_name_or_path again: the same base?
        from bumblecore.model.lora import fingerprint_difference, read_base_fingerprint, trained_where

        base = run.model.model_name_or_path
        recorded = read_base_fingerprint(checkpoint_dir)
        difference = recorded and fingerprint_difference(recorded, base)
        if difference:
            raise ValueError(
                f"resume_from_checkpoint: {checkpoint_dir} holds a LoRA adapter trained on another base than "
                f"model_name_or_path {base}: {difference}; {trained_where(recorded, base)}. Resume on its own "
                "base, or start afresh in another output_dir"
            )


def _run_outputs(output_dir: Path) -> list[str]:
    """What a run leaves that another run must not overwrite unasked: checkpoints, a model, a history."""
    found = []
    for path in sorted(output_dir.iterdir()):
        if path.name.startswith("checkpoint-") and path.is_dir():
            found.append(path.name)
        elif (
            path.name in ("config.json", "adapter_config.json", "model.safetensors.index.json")
            or path.suffix == ".safetensors"
        ):
            found.append(path.name)
        elif path.name == "metrics.jsonl" and path.stat().st_size > 0:
            found.append(path.name)
    return found


def _protected(run: TrainArgs) -> list[Path]:
    """Inputs that may live inside output_dir and are never deleted by overwrite_output_dir."""
    paths = [
        run.data.cache_dir,
        run.model.model_name_or_path,
        run.preference.ref_model_path,
        run.runtime.deepspeed_config_path,
    ]
    for key in ("dataset_path", "eval_dataset_path"):  # a file, a list, or a mixture's mapping
        if getattr(run.data, key):
            paths += [path for source in data_sources(getattr(run.data, key), key=key) for path in source.paths]
    return [Path(p).resolve() for p in paths if p]


def prepare_output_dir(run: TrainArgs, notes: list) -> Optional[Path]:
    """On rank 0, before any rank writes: clean up what killed saves left, find the checkpoint to resume
    (intact and of this run), and make sure a fresh run does not mix with another run's outputs.
    Returns the checkpoint to resume from, or None."""
    import yaml

    from bumblecore.train.checkpoint import remove_stale_temporaries, resolve_resume_dir

    output_dir = Path(run.output.output_dir)
    if output_dir.resolve() == Path(run.model.model_name_or_path).resolve():
        raise ValueError(
            f"output_dir {output_dir} is the model directory model_name_or_path: the run would overwrite "
            "the model it starts from; choose another output_dir"
        )
    for path in remove_stale_temporaries(output_dir):
        notes.append(f"removed {path}, left by a save that did not finish")
    resume_dir = resolve_resume_dir(output_dir, run.output.resume_from_checkpoint, notes)
    if resume_dir is not None:
        check_checkpoint_matches(resume_dir, run)
        return resume_dir
    if not output_dir.is_dir():
        return None
    found = _run_outputs(output_dir)
    if not found:
        return None  # empty, or only a token cache or a record of an attempt that produced nothing
    if run.output.overwrite_output_dir:
        protected = _protected(run)
        removed = 0
        for path in output_dir.iterdir():
            here = path.resolve()
            if any(here == p or here in p.parents for p in protected):
                continue
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed += 1
        notes.append(f"overwrite_output_dir: removed {removed} entries of the previous run from {output_dir}")
        return None
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    checkpoints = [name for name in found if name.startswith("checkpoint-")]
    remedy = (
        "set overwrite_output_dir: true to replace them"
        + (", resume_from_checkpoint: latest to continue that run" if checkpoints else "")
        + ", or choose another output_dir"
    )
    record = output_dir / RUN_RECORD
    if not record.is_file():
        raise ValueError(
            f"output_dir {output_dir} holds outputs of another run ({shown}) and no {RUN_RECORD} "
            f"that says which run wrote them; {remedy}"
        )
    try:
        previous = yaml.safe_load(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(
            f"output_dir {output_dir}: {RUN_RECORD} is unreadable ({type(err).__name__}) and the "
            f"directory holds a run's outputs ({shown}); {remedy}"
        ) from None
    differences = identity_differences(previous if isinstance(previous, dict) else {}, run.flat())
    if differences:
        more = f" and {len(differences) - 4} more" if len(differences) > 4 else ""
        raise ValueError(
            f"output_dir {output_dir} holds another run's outputs ({shown}): its {RUN_RECORD} differs "
            f"in {', '.join(differences[:4])}{more}; {remedy}"
        )
    if checkpoints:  # the same run again from the start: it rewrites the same steps, so nothing mixes
        notes.append(
            f"{output_dir} holds checkpoints of an earlier attempt of this run ({', '.join(checkpoints)}); "
            "starting afresh (resume_from_checkpoint: latest continues from them instead)"
        )
    return None


class ReportedByRankZero(ValueError):
    """Rank 0's error, raised on the other ranks so they stop too; rank 0 alone prints it (cli.main)."""

    reported_by_rank_zero = True


def agreed_on_rank_zero(fabric, decide):
    """`decide(notes)` runs on global rank 0 only; every rank gets its result, or raises its error, so
    no rank goes on alone (and none waits for a rank that stopped). The error is printed once: the
    other ranks raise it as ReportedByRankZero."""
    outcome, failure = None, None
    if fabric.is_global_zero:
        notes: list = []
        try:
            outcome = ("ok", decide(notes), notes)
        except Exception as err:
            failure, outcome = err, ("error", str(err), notes)
    if fabric.world_size > 1:
        outcome = fabric.broadcast(outcome, src=0)
    kind, value, notes = outcome
    if failure is not None:
        raise failure
    if kind == "error":
        raise ReportedByRankZero(value)
    return value, notes


# ---------------------------------------------------------------------------- main


def main(fabric, run: TrainArgs, deepspeed_config: dict | None = None, launcher: str | None = None) -> None:
    from bumblecore.data.commands import dataset_units, run_tokenizer
    from bumblecore.data.loader import BatchLoader, eval_batches
    from bumblecore.model.lora import apply_lora, trainable_share
    from bumblecore.tokenizer import check_fits_model
    from bumblecore.train.backend import share_fp32_master_weights
    from bumblecore.train.checkpoint import in_place_checkpoint_io, read_trainer_state
    from bumblecore.train.engine import Engine, LoopSettings
    from bumblecore.train.memory import release_freed_host_memory, release_freed_memory_promptly
    from bumblecore.train.monitor import Monitor
    from bumblecore.train.runtime import zero_stage
    from bumblecore.train.schedulers import build_scheduler
    from bumblecore.train.sft import LanguageModelingStage

    started = time.perf_counter()
    optimization, output = run.optimization, run.output
    fabric.seed_everything(optimization.seed)
    output_dir = Path(output.output_dir)
    # The model's own chat template (ours, ChatML, where it has none): what is trained is what is served.
    tokenizer = run_tokenizer(run.model)
    # resize_vocab grows the embedding to the tokenizer; else its ids must fit the model's rows.
    vocab_size = len(tokenizer) if run.model.resize_vocab else 0
    if not vocab_size:
        check_fits_model(
            tokenizer, run.model.model_name_or_path, run.model.model_name_or_path
        )  # before anything is written
    load_grown = functools.partial(load_model, vocab_size=vocab_size)
    resume_dir, notes = agreed_on_rank_zero(fabric, lambda notes: prepare_output_dir(run, notes))
    # The base as this run reads it, recorded beside every adapter it saves (model/lora.py).
    base = None
    if run.model.finetuning_type == "lora" and fabric.is_global_zero:
        from bumblecore.model.lora import base_fingerprint

        base = base_fingerprint(run.model.model_name_or_path)
    for note in notes + config_notes(run):
        fabric.print(f"note: {note}")
    if deepspeed_config is None:
        # Our checkpoint directory is atomic already: write the state once, in place, mode 0644.
        fabric.strategy.checkpoint_io = in_place_checkpoint_io()

    stage_of_zero = zero_stage(deepspeed_config)
    prompt_release = run.runtime.release_freed_memory
    if prompt_release is None:
        prompt_release = stage_of_zero == 3  # its ranks gather and free every weight each step
    prompt_release = prompt_release and release_freed_memory_promptly()
    plan = memory_plan(
        fabric, run, deepspeed_config, local_processes=_processes_per_node(fabric), prompt_release=prompt_release
    )
    plan.check()  # before anything is allocated or written
    # DeepSpeed with 16-bit weights keeps a 16-bit module and fp32 master weights itself: load 16-bit.
    weights_dtype = torch.float32
    if stage_of_zero is not None and optimization.train_model_precision in ("bf16", "fp16"):
        weights_dtype = torch.bfloat16 if optimization.train_model_precision == "bf16" else torch.float16
    model = load_grown(run, fabric, dtype=weights_dtype, partitioned=stage_of_zero == 3)
    release_freed_host_memory()
    if getattr(model, "is_transformers_fallback", False) and run.data.packing:
        fabric.print("note: packing is off for transformers models (their CPU attention would cross documents)")
        run.data = dataclasses.replace(run.data, packing=False)
    if run.model.finetuning_type == "lora":
        from bumblecore.data.chat_templates import added_token_ids
        from bumblecore.model.vocab import lora_token_indices

        new_rows = lora_token_indices(model, added_token_ids(tokenizer, tokenizer.bumblecore_added_tokens))
        model = apply_lora(
            model,
            run.lora.lora_rank,
            run.lora.lora_alpha,
            run.lora.lora_dropout,
            run.lora.lora_target_modules,
            trainable_token_indices=new_rows,
            zero3=stage_of_zero == 3,
        )
    trainable, total = trainable_share(model)

    def tokenized():  # the token cache, built once (see build_once) and memory-mapped by every rank
        def units_of(paths, progress, label, stage=run.model.training_stage, data=run.data):
            return dataset_units(data, stage, optimization.seed, tokenizer, paths, progress, label)

        progress = fabric.is_global_zero
        beside = {}  # a dpo/kto mixture's SFT sources: {name: (source, (cache, units))}, packed as for sft
        train_paths, label = run.data.dataset_path, "dataset_path"
        if run.model.training_stage in ("dpo", "kto"):
            pairs, conversations = sft_beside(run)
            if conversations:  # the pairs as one dataset, each SFT source its own
                train_paths, label = [path for source in pairs for path in source.paths], "dataset_path pairs"
                packed = dataclasses.replace(run.data, packing=True)
                for s in conversations:
                    beside[s.name] = (s, units_of(list(s.paths), progress, f"dataset_path {s.name}", "sft", packed))
        train_data = units_of(train_paths, progress, label)
        held_out = (
            units_of(run.data.eval_dataset_path, False, "eval_dataset_path")
            if run.data.eval_dataset_path
            else (None, None)
        )
        return train_data, held_out, beside

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def step_loader(units, packing: bool, group_by_length: bool = False):  # this rank's share of each step
        micro, accumulation = optimization.train_micro_batch_size_per_gpu, optimization.gradient_accumulation_steps
        return BatchLoader(
            units, micro, accumulation, fabric.world_size, fabric.global_rank, optimization.seed, pad_id, packing,
            group_by_length,
        )  # fmt: skip

    if run.model.training_stage == "grpo":  # prompts, not token units: the rollouts make the batches
        from bumblecore.train.grpo import GreedyEvaluation, build_grpo, read_grpo_prompts

        units, data_lines = read_grpo_prompts(run, tokenizer, run.data.dataset_path)
        stage, loader = build_grpo(fabric, run, units, tokenizer, pad_id)
        eval_units = eval_loader = None
        if run.data.eval_dataset_path:
            eval_units, eval_lines = read_grpo_prompts(run, tokenizer, run.data.eval_dataset_path, "eval_dataset_path")
            if len(eval_units) < fabric.world_size:
                raise ValueError(
                    f"eval_dataset_path: {len(eval_units)} prompts for {fabric.world_size} processes; give one per process"
                )
            eval_loader = GreedyEvaluation(loader, eval_units, fabric.world_size, fabric.global_rank)
            data_lines += eval_lines
    else:
        (train_cache, units), (eval_cache, eval_units), beside = build_once(fabric, tokenized)
        if eval_units is not None and len(eval_units) < fabric.world_size:  # every rank evaluates a share
            raise ValueError(
                f"eval_dataset_path: {len(eval_units)} eval units for {fabric.world_size} processes; "
                "give at least one per process"
            )
        lengths = getattr(train_cache, "lengths", None)
        if not run.data.packing and not beside and run.model.training_stage in ("sft", "dpo") and lengths is not None:
            # Padded rows are as long as their batch's longest sample, not cutoff_len: the plan checked above is
            # the bound made before the data was read; this one, from the data, is what the run's peak is held to.
            longest = min(int(lengths.max(initial=1)), run.data.cutoff_len)
            plan = memory_plan(
                fabric,
                run,
                deepspeed_config,
                _processes_per_node(fabric),
                sequence_length=longest,
                runtime=plan.runtime,
                prompt_release=prompt_release,
            )
        loader = step_loader(units, bool(run.data.packing), run.data.group_by_length)
        eval_loader = (
            eval_batches(
                eval_units,
                optimization.train_micro_batch_size_per_gpu,
                pad_id,
                bool(run.data.packing),
                fabric.world_size,
                fabric.global_rank,
            )
            if eval_units is not None
            else None
        )
        data_lines = [
            f"  data: {len(units)} training units ({'packed' if run.data.packing else 'padded'} rows of <= {run.data.cutoff_len} tokens)"
            + (f", {len(eval_units)} eval units" if eval_units is not None else ""),
            f"  dataset: {train_cache.summary.counts()}",
            *_source_lines(run, train_cache, units),
            *([f"  eval dataset: {eval_cache.summary.counts()}"] if eval_cache is not None else []),
            *[f"    {example}" for example in train_cache.summary.examples()],
            *[
                f"  beside the pairs: SFT source {name}, {len(u)} units (packed rows of <= {run.data.cutoff_len} "
                f"tokens; {cache.summary.counts()}), loss weight {source.loss_weight}: a term of its own, its mean "
                "over its target tokens of the step"
                for name, (source, (cache, u)) in beside.items()
            ],
        ]
    total_steps = loader.total_steps(optimization.num_epochs, optimization.max_steps)
    warmup_steps = math.ceil(optimization.warmup_ratio * total_steps)

    adamw = torch.optim.AdamW(
        optimizer_groups(model, optimization.weight_decay),
        lr=optimization.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=True,
    )
    model, optimizer = fabric.setup(model, adamw)
    share_fp32_master_weights(model)
    release_freed_host_memory()  # DeepSpeed's setup copies every partition once more
    # The schedule drives AdamW's own param groups: under DeepSpeed the ZeRO optimizer wraps it and steps it.
    scheduler = build_scheduler(
        optimization.lr_scheduler_type, adamw, warmup_steps, total_steps, **optimization.lr_scheduler_kwargs
    )

    if run.model.training_stage == "grpo":
        loader.bind(model, grpo_reference(fabric, run, model, load_grown), fabric.device, fabric.autocast)
    else:
        stage = LanguageModelingStage()
    if run.model.training_stage in ("dpo", "kto"):
        from bumblecore.train.dpo import build_preference_stage
        from bumblecore.train.kto import build_kto_stage

        def load_reference(path):
            return load_grown(
                dataclasses.replace(
                    run,
                    model=dataclasses.replace(run.model, model_name_or_path=path),
                    optimization=dataclasses.replace(run.optimization, enable_gradient_checkpointing=False),
                ),
                fabric,
            )

        build_stage = build_kto_stage if run.model.training_stage == "kto" else build_preference_stage
        stage, attach_reference = build_stage(
            fabric,
            run,
            model,
            units,
            eval_units,
            pad_id,
            resuming=resume_dir is not None,
            load_reference_model=load_reference,
        )
        loader = attach_reference(loader, "train")
        eval_loader = attach_reference(eval_loader, "eval") if eval_loader is not None else None
        if beside:
            from bumblecore.train.auxiliary import StepsWithSFT, WithSFT

            loader = StepsWithSFT(loader, {name: step_loader(u, True) for name, (_, (_, u)) in beside.items()})
            weights = {name: source.loss_weight for name, (source, _) in beside.items()}
            stage = WithSFT(stage, weights, main=run.model.training_stage)
    monitor = Monitor(
        output_dir,
        output.use_tensorboard,
        output.save_train_log,
        fabric.is_global_zero,
        resume_step=read_trainer_state(resume_dir)["step"] if resume_dir else None,
    )
    # The log starts with what this attempt ran with (a resume may change keys such as max_steps).
    monitor.info("resolved configuration:\n" + to_yaml(run).rstrip())
    for note in notes + config_notes(run):
        monitor.info(f"note: {note}")
    settings = LoopSettings(
        total_steps=total_steps,
        max_grad_norm=optimization.max_grad_norm,
        logging_steps=output.logging_steps,
        eval_steps=output.eval_steps or (output.save_steps if eval_loader else None),
        eval_at_end=output.eval_at_end,
        save_steps=output.save_steps,
        save_total_limit=output.save_total_limit,
        save_last=output.save_last,
        average_tokens_across_devices=optimization.average_tokens_across_devices,
        skips_overflow_steps=optimization.train_model_precision == "fp16",
    )
    exporter = Exporter(fabric, run, tokenizer, monitor, base_fingerprint=base)
    engine = Engine(
        fabric,
        model,
        optimizer,
        scheduler,
        stage,
        loader,
        settings,
        monitor,
        save_fn=lambda step, final: exporter.checkpoint(engine, step, final),
        eval_loader=eval_loader,
    )
    if resume_dir is not None:
        engine.load_state(resume_dir)
        fabric.print(f"resumed from {resume_dir} at step {engine.step}")

    if fabric.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_args.yaml").write_text(to_yaml(run), encoding="utf-8")
    banner = [
        f"BumbleCore train: stage {run.model.training_stage}, {run.model.finetuning_type} fine-tuning, model {run.model.model_name_or_path}",
        *data_lines,
        f"  processes: {fabric.world_size} ({_processes_per_node(fabric)} per node x {fabric.world_size // _processes_per_node(fabric)} node(s), "
        f"started by {launcher or ('bumblecore' if fabric.world_size > 1 else 'this command')}), {fabric.device.type}, "
        f"{torch.get_num_threads()} intra-op thread(s) each",
        f"  batch: {optimization.train_micro_batch_size_per_gpu} micro x {fabric.world_size} device(s) x {optimization.gradient_accumulation_steps} "
        f"accumulation = {loader.global_size} per step; {loader.steps_per_epoch} steps/epoch, {total_steps} steps, {warmup_steps} warmup",
        f"  parameters: {total:,} ({trainable:,} trainable, {trainable / max(1, total):.2%})",
        f"  features: precision {optimization.train_model_precision}, scheduler {optimization.lr_scheduler_type}, lr {optimization.learning_rate}, "
        f"gradient checkpointing {'on' if optimization.enable_gradient_checkpointing else 'off'}, "
        f"attention {getattr(getattr(model, 'config', None), 'attn_implementation', 'transformers')}, "
        f"strategy {type(fabric.strategy).__name__}"
        + (f" (ZeRO-{stage_of_zero})" if stage_of_zero is not None else ""),
        *plan.lines(),
    ]
    if getattr(stage, "summary", ""):
        banner.append(f"  {stage.summary}")
    for line in banner:
        fabric.print(line)
        monitor.info(line)

    engine.fit()
    exporter.export_final(engine)
    monitor.close(smooth=run.model.training_stage != "pretrain")
    fabric.print(f"done in {time.perf_counter() - started:.1f}s: {output.output_dir}")
    _report_peak_memory(fabric, monitor, plan.peak_mb)  # the run's last line


def _source_lines(run: TrainArgs, cache, units) -> list[str]:
    """A mixture's sources in the banner: records, share of the trained tokens, weights."""
    from bumblecore.data.dataset_spec import run_sources
    from bumblecore.data.mixture import source_records, source_report

    sources = run_sources(run.data, run.data.dataset_path)
    return source_report(units, sources, source_records(cache, sources))


def sft_beside(run: TrainArgs) -> tuple[list, list]:
    """A dpo/kto run's (preference sources, SFT sources); the pairs take no sampling or loss weights."""
    from bumblecore.data.dataset_spec import run_sources
    from bumblecore.train.auxiliary import split_sft_sources

    pairs, conversations = split_sft_sources(run_sources(run.data, run.data.dataset_path))
    if conversations and (
        run.data.mix_strategy != "concat" or any(s.weight != 1.0 or s.loss_weight != 1.0 for s in pairs)
    ):
        raise ValueError(
            "dataset_path: beside SFT sources, the preference sources are one dataset (mix_strategy concat, "
            "loss weight 1); the SFT sources take loss weights"
        )
    return pairs, conversations


def grpo_reference(fabric, run: TrainArgs, model, load):
    """GRPO's KL reference (beta > 0): the LoRA base with its adapter disabled, else a frozen copy of the start."""
    from bumblecore.train.grpo import LiveReference

    if not run.grpo.beta:
        return None
    if run.model.finetuning_type == "lora":
        return LiveReference(policy=model)
    frozen = dataclasses.replace(
        run, optimization=dataclasses.replace(run.optimization, enable_gradient_checkpointing=False)
    )
    return LiveReference(frozen=fabric.to_device(load(frozen, fabric)))


def _report_peak_memory(fabric, monitor, planned_mb: int) -> None:
    """The run's last line: each rank's peak host RSS (and GPU memory) beside the plan for a rank,
    printed by rank 0 (docs/DESIGN.md: `peak memory per rank: host RSS <A> MB[, <B> MB] (planned <P> MB)`)."""
    from bumblecore.train.memory import peak_host_rss_bytes

    gpu = torch.cuda.max_memory_allocated(fabric.device) if fabric.device.type == "cuda" else 0
    peaks = torch.zeros(fabric.world_size, 2, dtype=torch.float64, device=fabric.device)
    peaks[fabric.global_rank] = torch.tensor([float(peak_host_rss_bytes()), float(gpu)], dtype=torch.float64)
    peaks = (fabric.all_reduce(peaks, reduce_op="sum") if fabric.world_size > 1 else peaks).cpu()
    line = "peak memory per rank: host RSS " + ", ".join(f"{v / 2**20:,.0f} MB" for v in peaks[:, 0].tolist())
    if gpu:
        line += "; GPU " + ", ".join(f"{v / 2**20:,.0f} MB" for v in peaks[:, 1].tolist())
    line += f" (planned {planned_mb:,} MB)"
    fabric.print(line)
    monitor.info(line)


# ---------------------------------------------------------------------------- saving


def _is_bumblebee_model(model) -> bool:
    from bumblecore.model.bumblebee import Bumblebee

    return isinstance(model, Bumblebee)


class Exporter:
    """Writes checkpoints (HF export + resume state, atomically) and the final model."""

    def __init__(self, fabric, run: TrainArgs, tokenizer, monitor, base_fingerprint: Optional[dict] = None):
        self.fabric, self.run, self.tokenizer, self.monitor = fabric, run, tokenizer, monitor
        self.base_fingerprint = base_fingerprint  # LoRA: the base the adapters are trained on

    def _save_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.run.optimization.train_model_precision, torch.float32
        )

    def write_model(self, model, directory: Path) -> None:
        """The HF-format model (or peft adapter) and tokenizer; rank 0 writes, all ranks join (sharded states)."""
        from bumblecore.data.chat_templates import write_end_of_turn
        from bumblecore.data.commands import CHAT_STAGES
        from bumblecore.model.lora import save_adapter
        from bumblecore.train.backend import gathered_state_dict, gathered_tensors, partitions_weights

        bare = getattr(model, "module", model)
        lora = self.run.model.finetuning_type == "lora"
        if not lora and partitions_weights(model) and _is_bumblebee_model(bare):
            # ZeRO-3: gather and write one tensor at a time; rank 0 never holds the consolidated model.
            stream = gathered_tensors(model, self._save_dtype(), self.fabric.is_global_zero)
            if not self.fabric.is_global_zero:
                for _ in stream[1]:  # join every gather
                    pass
                return
            directory.mkdir(parents=True, exist_ok=True)
            bare.save_pretrained(directory, stream=stream)
        else:
            state = gathered_state_dict(self.fabric, model, trainable_only=lora)  # every rank joins under ZeRO-3
            if not self.fabric.is_global_zero:
                return
            directory.mkdir(parents=True, exist_ok=True)
            if lora:
                save_adapter(
                    bare,
                    directory,
                    self.run.model.model_name_or_path,
                    state_dict=state,
                    fingerprint=self.base_fingerprint,
                )
            else:
                dtype = self._save_dtype()
                casted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
                bare.save_pretrained(directory, state_dict=casted)
        self.tokenizer.save_pretrained(str(directory))
        if self.run.model.training_stage in CHAT_STAGES:  # generation stops where the trained replies end
            write_end_of_turn(directory, self.tokenizer, self.run.model.model_name_or_path)

    def checkpoint(self, engine, step: int, final: bool) -> None:
        from bumblecore.train.checkpoint import rotate_checkpoints, save_checkpoint

        name = f"checkpoint-{step}" if not final else "checkpoint-last"

        def contents(tmp: Path) -> None:
            self.write_model(engine.model, tmp)
            engine.save_state(tmp)

        state = {"step": step, "tokens_seen": engine.tokens_seen, **checkpoint_identity(self.run)}
        path = save_checkpoint(
            self.run.output.output_dir, name, contents, state, self.fabric.is_global_zero, self.fabric.barrier
        )
        if self.fabric.is_global_zero:
            if not final:
                rotate_checkpoints(self.run.output.output_dir, self.run.output.save_total_limit)
            self.monitor.plot(smooth=self.run.model.training_stage != "pretrain")
            self.monitor.info(f"saved {path}")

    def export_final(self, engine) -> None:
        """The trained model at output_dir's root (docs/ARCHITECTURE.md, "What a training run writes")."""
        self.write_model(engine.model, Path(self.run.output.output_dir))
        self.fabric.barrier()
