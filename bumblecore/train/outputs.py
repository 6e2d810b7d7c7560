"""What a training run writes: the output-dir guard (another run's outputs are never mixed in or
overwritten unasked), the run's identity (training_args.yaml, checked on resume), checkpoints with
their rotation, the exported model, and the run's last line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from bumblecore.args import TrainArgs, flat_defaults
from bumblecore.data.dataset_spec import data_sources
from bumblecore.model.adapter_base import BASE_CONFIG_KEYS  # a checkpoint continues only a model of this config


def to_yaml(run: TrainArgs) -> str:
    """The run's flat keys, as training_args.yaml holds them (and `--config` reads them back)."""
    import yaml

    return yaml.safe_dump(run.flat(), sort_keys=False, allow_unicode=True)


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
        "report_to",
        "run_name",
        "tracker_project",
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
        from bumblecore.chat.templates import parse_special_tokens

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
        "model_shape": {k: raw[k] for k in BASE_CONFIG_KEYS if k in raw},
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
        from bumblecore.model.adapter_base import fingerprint_difference, read_base_fingerprint, trained_where

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


def report_peak_memory(fabric, monitor, planned_mb: int) -> None:
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


def open_monitor(fabric, run: TrainArgs, resume_dir: Optional[Path], notes: list[str]):
    """The run's log, metrics and trackers (train/monitor.py), opened with the configuration and the notes."""
    from bumblecore.train.checkpoint import read_trainer_state
    from bumblecore.train.monitor import Monitor

    output = run.output
    monitor = Monitor(
        Path(output.output_dir),
        output.report_to,
        output.save_train_log,
        fabric.is_global_zero,
        resume_step=read_trainer_state(resume_dir)["step"] if resume_dir else None,
        hyperparameters=run.flat(),
        run_name=output.run_name,
        tracker_project=output.tracker_project,
    )
    # The log starts with what this attempt ran with (a resume may change keys such as max_steps).
    monitor.info("resolved configuration:\n" + to_yaml(run).rstrip())
    for note in notes:
        monitor.info(f"note: {note}")
    return monitor


def write_run_record(fabric, run: TrainArgs) -> None:
    """training_args.yaml: what names the run (another attempt in output_dir is checked against it)."""
    if fabric.is_global_zero:
        output_dir = Path(run.output.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_RECORD).write_text(to_yaml(run), encoding="utf-8")


def _is_bumblebee_model(model) -> bool:
    from bumblecore.model.bumblebee import Bumblebee

    return isinstance(model, Bumblebee)


class Exporter:
    """Writes checkpoints (HF export + resume state, atomically) and the final model."""

    def __init__(
        self,
        fabric,
        run: TrainArgs,
        tokenizer,
        monitor,
        base_fingerprint: Optional[dict] = None,
        chat: bool = True,
        smooth_curves: bool = True,
    ):
        self.fabric, self.run, self.tokenizer, self.monitor = fabric, run, tokenizer, monitor
        self.base_fingerprint = base_fingerprint  # LoRA: the base the adapters are trained on
        self.chat = chat  # the stage trained conversations: generation stops where the trained replies end
        self.smooth_curves = smooth_curves

    def _save_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.run.optimization.train_model_precision, torch.float32
        )

    def write_model(self, model, directory: Path) -> None:
        """The HF-format model (or peft adapter) and tokenizer; rank 0 writes, all ranks join (sharded states)."""
        from bumblecore.chat.templates import write_end_of_turn
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
        if self.chat:  # generation stops where the trained replies end
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
            self.monitor.plot(smooth=self.smooth_curves)
            self.monitor.info(f"saved {path}")

    def export_final(self, engine) -> None:
        """The trained model at output_dir's root (docs/ARCHITECTURE.md, "What a training run writes")."""
        self.write_model(engine.model, Path(self.run.output.output_dir))
        self.fabric.barrier()
