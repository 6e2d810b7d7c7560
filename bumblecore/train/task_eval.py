"""`eval_tasks`: lm-evaluation-harness tasks on the model being trained, at each evaluation of the engine
(train/engine.py), logged as `eval/<task>/<metric>` beside `eval/loss`.

Rank 0 runs the tasks on its own copy of the weights (every rank holds them whole, but for ZeRO-3, which
is refused) while the other ranks wait; the metrics are then broadcast so every rank logs the same
record. The random states are put back afterwards: lm-eval seeds random, numpy and torch, and training
must draw the same numbers whether or not it evaluated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from bumblecore.args import TrainArgs


def check_eval_tasks(run: TrainArgs) -> None:
    """Before anything starts: lm-eval installed, every task known, the weights whole on rank 0."""
    if not run.output.eval_tasks:
        return
    from bumblecore.inference.evaluate import local_tasks
    from bumblecore.train.launch import load_zero_stage

    local_tasks(run.output.eval_tasks, key="eval_tasks")
    path = run.runtime.deepspeed_config_path
    if path and load_zero_stage(path) == 3:
        raise ValueError(
            "eval_tasks runs lm-eval on rank 0's whole model, which ZeRO-3 partitions across ranks; "
            "use ZeRO-1/2, or evaluate a saved checkpoint with `bumblecore eval`"
        )


def task_evaluator(fabric, run: TrainArgs, tokenizer) -> Optional[Callable[[object], dict]]:
    """The engine's extra evaluation for eval_tasks (None without them): model -> {"eval/<task>/<metric>": value}."""
    if not run.output.eval_tasks:
        return None
    from bumblecore.inference.evaluate import run_tasks, task_metrics
    from bumblecore.inference.generate import default_eos_ids
    from bumblecore.inference.harness import BumblecoreLM
    from bumblecore.train.checkpoint import restore_rng_state, rng_state

    eos = default_eos_ids(run.model.model_name_or_path, tokenizer)

    def evaluate(model) -> dict:
        metrics = {}
        if fabric.is_global_zero:
            state = rng_state()
            # The module itself, not its DDP wrapper: a forward through DDP on one rank would wait for the others.
            plain = getattr(model, "module", model)
            lm = BumblecoreLM(
                model=plain,
                tokenizer=tokenizer,
                eos_token_ids=eos,
                batch_size=run.optimization.train_micro_batch_size_per_gpu,
            )
            results = run_tasks(lm, run.output.eval_tasks, limit=run.output.eval_tasks_limit)
            metrics = {f"eval/{name}": value for name, value in task_metrics(results).items()}
            restore_rng_state(state)
        if fabric.world_size > 1:
            metrics = fabric.broadcast(metrics, src=0)
        return metrics

    return evaluate
