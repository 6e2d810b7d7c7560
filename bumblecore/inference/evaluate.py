"""`bumblecore eval`: lm-evaluation-harness tasks on a model directory or a LoRA adapter, through lm-eval's
Python API with our model (inference/harness.py) and local task YAMLs (inference/eval_tasks/ and the
user's `include_path`): nothing is fetched from the hub. A training run evaluates the same way
(`run_tasks`, `task_metrics`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Union

from bumblecore.inference.eval_tasks import TASKS_DIR


def import_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ValueError(
            "evaluation needs lm-evaluation-harness: pip install 'bumblecore[eval]' (or pip install lm-eval)"
        ) from None
    return lm_eval


def task_names(tasks: Union[str, list[str]]) -> list[str]:
    """`a,b` or [a, b] (or both) as [a, b], as lm-eval's --tasks takes them."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    return [name.strip() for entry in names for name in entry.split(",") if name.strip()]


def local_tasks(tasks: Union[str, list[str]], include_path: Optional[list[str]] = None, key: str = "--tasks"):
    """(lm-eval's TaskManager over our local tasks and include_path, the task names), checked: a missing
    lm-eval, a missing folder or an unknown task is an error naming it (and `key`, the option that named it)."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    names = task_names(tasks)
    if not names:
        raise ValueError(f"{key}: name at least one task (e.g. demo_qa_choice,demo_qa_exact)")
    for path in include_path or []:
        if not Path(path).exists():
            raise FileNotFoundError(f"include_path {path}: no such file or folder of task YAMLs")
    manager = TaskManager(include_path=[str(TASKS_DIR), *(include_path or [])], include_defaults=False)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"{key} {', '.join(unknown)}: no such task among the local ones ({', '.join(manager.all_tasks)}); "
            "give the folder of your task YAMLs with --include_path"
        )
    return manager, names


def run_tasks(
    lm,
    tasks: Union[str, list[str]],
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    include_path: Optional[list[str]] = None,
    seed: int = 1234,
    log_samples: bool = False,
) -> dict:
    """lm_eval.simple_evaluate on an lm-eval model with our local tasks (plus include_path); its
    results dict."""
    lm_eval = import_lm_eval()
    manager, names = local_tasks(tasks, include_path)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def task_metrics(results: dict) -> dict[str, float]:
    """`{"<task>/<metric>": value}` from simple_evaluate's results: the metrics, not their standard
    errors; a metric under a filter other than lm-eval's default ("none") is `<metric>_<filter>`."""
    out = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            out[f"{task}/{metric if filter_name == 'none' else f'{metric}_{filter_name}'}"] = float(value)
    return out


def evaluate(
    model_path: str,
    tasks: list[str],
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    batch_size: int = 16,
    dtype: str = "auto",
    device: str = "auto",
    output_path: Optional[str] = None,
    include_path: Optional[list[str]] = None,
    log_samples: bool = False,
    seed: int = 1234,
    base_model_path: Optional[str] = None,
    trust_remote_code: bool = False,
) -> dict:
    """Evaluate a model with lm-evaluation-harness on local tasks; writes the results JSON (default:
    <model_path>/eval_results.json) and prints one line per metric.

    Args:
        model_path: a model directory (HF layout) or a LoRA adapter directory.
        tasks: task names, comma- or space-separated: the shipped demo_qa_choice (multiple choice by log-likelihood) and demo_qa_exact (generation, exact match), or those of --include_path.
        limit: evaluate only the first N documents of each task (below 1: that fraction).
        num_fewshot: few-shot examples before each question (default: the task's own).
        batch_size: requests scored or generated together.
        dtype: auto (the checkpoint's), float32, float16 or bfloat16.
        device: auto, cpu or cuda:N.
        output_path: where the results JSON goes (default: <model_path>/eval_results.json); a folder gets eval_results.json inside.
        include_path: folders (or YAML files) of your own lm-eval tasks; datasets local (e.g. dataset_path: json with dataset_kwargs data_files).
        log_samples: keep every document's requests and responses in the JSON (under "samples").
        seed: lm-eval's random, numpy, torch and few-shot seeds.
        base_model_path: for a LoRA adapter: the base to apply it to (default: the one the adapter names).
        trust_remote_code: allow a model or tokenizer that ships its own Python code (only for directories you trust).
    """
    import_lm_eval()
    from lm_eval.utils import handle_non_serializable

    from bumblecore.inference.harness import BumblecoreLM
    from bumblecore.model.hf_io import _atomic_write_text

    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"--model_path {model_path}: no such model directory")
    local_tasks(tasks, include_path)  # a wrong task name is said before the model is read
    target = Path(output_path) if output_path else Path(model_path) / "eval_results.json"
    if target.is_dir():
        target = target / "eval_results.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    lm = BumblecoreLM(
        model_path,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        base_model_path=base_model_path,
        trust_remote_code=trust_remote_code,
    )
    results = run_tasks(lm, tasks, limit, num_fewshot, include_path, seed, log_samples)
    results["config"]["model"] = "bumblecore"
    results["config"]["model_args"] = {"model_path": str(model_path), "dtype": dtype}
    _atomic_write_text(target, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    for name, value in task_metrics(results).items():
        print(f"{name}: {value:.4f}")
    print(f"results: {target}", file=sys.stderr)
    return results
