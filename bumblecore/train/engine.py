"""THE training loop, shared by every stage.

forward -> loss -> backward -> accumulate -> clip -> step -> schedule -> log -> eval -> save; backward
to step are the stepper's of the model's backend (Fabric/DDP or DeepSpeed: train/backend.py).

A stage supplies two functions over its own batches:
    count(batch) -> int           how many units (target tokens, pairs) the batch's loss sums over
    loss(model, batch) -> (sum, metrics)   the summed loss and summed metrics, as tensors
A stage with several loss terms (a mixture with loss weights: one per source) gives count a dict
{term: units} and loss a dict {term: summed, weighted loss}, the same names in the same order on every
rank; the engine divides each term by its own units over the step and adds them:
L = sum_t sum_t / units_t (docs/CONFIG.md, "Mixtures and loss weights"). A single loss is the one term
`loss`: the engine has one path for both.
A metric is a sum the engine divides by the step's count like the loss, or a (sum, count) pair for a
mean over units of its own (KTO's rewards of its desirable examples): the sums and the counts are
added over the step (and ranks) and divided once; a step with none of those units does not log it.
An optional `finish_record(record)` derives metrics from those means (the reward model's std).
The engine divides by the count of the whole optimiser step, across accumulation steps and
devices, so a global batch gives the same update however it is split. With
average_tokens_across_devices false it is the original's loss instead: the mean over the step's
micro-batches (all ranks') of each micro-batch's own mean, count(micro-batch) units each.

The loader supplies, for optimiser step s, this rank's micro-batches: `micro_batches(s)`; its
position is the step number, so resuming restores it without replaying data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from bumblecore.train.backend import gradient_averaging_size, stepper_for
from bumblecore.train.checkpoint import STATE_DIR, restore_rng_state, rng_state
from bumblecore.train.schedulers import resume_schedule


class NonFiniteTraining(FloatingPointError, ValueError):
    """The loss or the gradient norm is not finite: the run stops before the update. A ValueError too,
    so the command line reports it in one line (a diverging learning rate is the user's to fix)."""


class Stage(Protocol):
    def count(self, batch: dict) -> int: ...

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class StepLoader(Protocol):
    steps_per_epoch: int

    def micro_batches(self, step: int) -> list[dict]: ...


@dataclass
class LoopSettings:
    total_steps: int
    max_grad_norm: Optional[float] = 1.0
    logging_steps: int = 1
    eval_steps: Optional[int] = None
    eval_at_end: bool = True
    """Evaluate after the last step too (when there is eval data), unless that step evaluated already."""
    save_steps: Optional[int] = None
    save_total_limit: Optional[int] = 3
    save_last: bool = False
    average_tokens_across_devices: bool = True
    skips_overflow_steps: bool = False
    """fp16: the grad scaler (or DeepSpeed's loss scaler) skips a step whose gradients overflow, so a
    non-finite gradient norm there is routine; only a non-finite loss stops the run."""


class Engine:
    def __init__(
        self,
        fabric,
        model,
        optimizer,
        scheduler,
        stage: Stage,
        loader: StepLoader,
        settings: LoopSettings,
        monitor,
        save_fn: Optional[Callable[[int, bool], None]] = None,
        eval_loader=None,
        progress: bool = True,
        task_eval: Optional[Callable] = None,
    ):
        """task_eval: model -> {"eval/<task>/<metric>": value}, run at each evaluation after the eval loss
        (lm-eval's tasks, train/task_eval.py)."""
        self.fabric, self.model, self.optimizer, self.scheduler = fabric, model, optimizer, scheduler
        self.stage, self.loader, self.settings, self.monitor = stage, loader, settings, monitor
        self.save_fn, self.eval_loader, self.progress = save_fn, eval_loader, progress
        self.task_eval = task_eval
        self.task_metric_names: tuple = ()  # the last task evaluation's, for the terminal line
        self.evaluates = eval_loader is not None or task_eval is not None
        self.stepper = stepper_for(fabric, model, optimizer, settings)  # backward to update, per backend
        self.averaged_over = gradient_averaging_size(fabric, model)  # the world, or its data-parallel size under SP
        self.step = 0
        self.tokens_seen = 0

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        """What a checkpoint must hold to continue exactly (fabric.save converts model/optimizer)."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "rng": rng_state(),
            # a loader with state of its own (GRPO's current rollouts; the others are indexed by step alone)
            **({"loader": self.loader.state_dict()} if hasattr(self.loader, "state_dict") else {}),
        }

    def save_state(self, directory) -> None:
        self.fabric.save(f"{directory}/{STATE_DIR}", self.state())

    def load_state(self, directory) -> None:
        state = {"model": self.model, "optimizer": self.optimizer}
        try:
            rest = self.fabric.load(f"{directory}/{STATE_DIR}", state)
            self.scheduler.load_state_dict(rest["scheduler"])
            self.step, self.tokens_seen = rest["step"], rest["tokens_seen"]
            restore_rng_state(rest["rng"])
            if "loader" in rest and hasattr(self.loader, "load_state_dict"):
                self.loader.load_state_dict(rest["loader"])
            resume_schedule(self.scheduler, self.step)  # this run's schedule (its total steps) from here on
        except Exception as err:  # unreadable, or a state of another shape: one clear line, not a traceback
            reason = (str(err).strip().splitlines() or [""])[0][:300]
            raise ValueError(
                f"resume_from_checkpoint {directory}: {STATE_DIR} cannot be restored ({type(err).__name__}: {reason})"
            ) from err

    # ------------------------------------------------------------------ loop

    def train_step(self) -> dict:
        """One optimiser step over this rank's micro-batches; returns the step's metrics.

        The loss is a dict of terms (a stage's single loss is the term `loss`), each divided by its own
        units over the step (`_divisors`); the stepper of the model's backend (train/backend.py) runs
        the backward, the accumulation, the clipping and the update. The step's sums (units, tokens,
        each term's loss, metrics) and a flag for non-finite gradients are all-reduced once, before the
        update, so every rank stops together on a non-finite loss or gradient norm and nothing
        non-finite ever reaches the weights."""
        fabric, stepper = self.fabric, self.stepper
        started = time.perf_counter()
        micro_batches = self.loader.micro_batches(self.step)
        counts = [as_terms(self.stage.count(b)) for b in micro_batches]
        terms = list(counts[0])
        scales, weights, units = self._divisors(counts, terms)
        multiplier = stepper.loss_multiplier(len(micro_batches))

        self.model.train()
        loss_sums = {t: torch.zeros((), device=fabric.device) for t in terms}  # what the step reports, per term
        metric_totals: dict[str, torch.Tensor] = {}
        metric_counts: dict[str, torch.Tensor] = {}  # the own units of (sum, count) metrics
        tokens = 0
        for index, batch in enumerate(micro_batches):
            batch = fabric.to_device(batch)
            last = index == len(micro_batches) - 1
            with stepper.accumulating(last):
                with fabric.autocast():  # the stage may apply the LM head outside the wrapped forward
                    losses, metrics = self.stage.loss(self.model, batch)
                losses = as_terms(losses)
                stepper.backward(weighted_sum(losses, {t: s * multiplier for t, s in scales[index].items()}), last)
            for t in terms:
                loss_sums[t] += losses[t].detach() * weights[index][t]
            weight = weights[index][terms[0]]  # the stage's plain metrics go with its first term's units
            for key, value in metrics.items():
                if isinstance(value, tuple):  # a mean over units of its own: plain sums in either loss mode
                    metric_counts[key] = metric_counts.get(key, 0) + torch.as_tensor(value[1]).detach()
                    metric_totals[key] = metric_totals.get(key, 0) + value[0].detach()
                else:
                    metric_totals[key] = metric_totals.get(key, 0) + value.detach() * weight
            tokens += int(batch.get("num_tokens", batch["input_ids"].numel()))
            # Drop this micro-batch's graph before the next forward: the loss still referenced it (measured:
            # accumulating 8 micro-batches of the README's sft_lora line peaked ~450 MB higher).
            del losses, metrics, batch

        finite, norm = stepper.finish_gradients()
        # What the plain metrics (and, for the per-micro-batch mean, the loss) are divided by.
        count = len(micro_batches) if units is None else sum(c[terms[0]] for c in counts)
        totals = self._step_totals(count, tokens, loss_sums, metric_totals, metric_counts, finite)
        global_count = max(1.0, totals["count"])
        divisors = units or dict.fromkeys(terms, global_count)
        loss = sum(totals["losses"][t] / divisors[t] for t in terms)
        self._stop_if_not_finite(loss, totals, norm)
        grad_norm = stepper.step()
        lr = self.optimizer.param_groups[0]["lr"]
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        self.step += 1

        global_tokens = int(totals["tokens"])
        self.tokens_seen += global_tokens
        elapsed = time.perf_counter() - started
        record = {
            "step": self.step,
            "epoch": round(self.step / max(1, self.loader.steps_per_epoch), 4),
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": global_tokens,
            "tokens_per_sec": global_tokens / elapsed if elapsed > 0 else 0.0,
        }
        for key in metric_totals:
            if key not in metric_counts:
                record[key] = totals["metrics"][key] / global_count
            elif totals["metric_counts"][key] > 0:
                record[key] = totals["metrics"][key] / totals["metric_counts"][key]
        return finish_record(self.stage, record)

    def _divisors(self, counts: list[dict], terms: list[str]):
        """Per micro-batch, each term's gradient scale and the weight its reported sum is added with;
        and each term's units over the whole step (every micro-batch of every rank, all-reduced in one
        go), or None for the original's loss (average_tokens_across_devices false): the mean over the
        step's micro-batches (of every rank) of each one's own mean over its units."""
        n = len(counts)
        if not self.settings.average_tokens_across_devices:
            # DDP's gradient average over ranks supplies the 1/world_size; the report is divided by the count below.
            scales = [{t: 1.0 / (max(1, c[t]) * n) for t in terms} for c in counts]
            return scales, [{t: 1.0 / max(1, c[t]) for t in terms} for c in counts], None
        local = torch.tensor([float(sum(c[t] for c in counts)) for t in terms], dtype=torch.float64)
        if self.fabric.world_size > 1:
            local = self.fabric.all_reduce(local.to(self.fabric.device), reduce_op="sum").cpu()
        units = {t: max(1.0, float(u)) for t, u in zip(terms, local.tolist())}
        # DDP averages gradients over ranks (DeepSpeed under SP: over the data-parallel ones); multiplying
        # back makes each term a global sum / its global units.
        averaged = self.averaged_over
        return [{t: averaged / units[t] for t in terms}] * n, [dict.fromkeys(terms, 1.0)] * n, units

    def _step_totals(
        self, count: int, tokens: int, loss_sums: dict, metric_totals: dict, metric_counts: dict, grads_finite: bool
    ) -> dict:
        """The step's sums over every rank, in one all-reduce (none on a single process)."""
        terms, keys, count_keys = list(loss_sums), sorted(metric_totals), sorted(metric_counts)
        values = [
            torch.tensor(float(count), dtype=torch.float64),
            torch.tensor(float(tokens), dtype=torch.float64),
            torch.tensor(0.0 if grads_finite else 1.0, dtype=torch.float64),
            *[loss_sums[t] for t in terms],
            *[torch.as_tensor(metric_totals[k]) for k in keys],
            *[torch.as_tensor(metric_counts[k]) for k in count_keys],
        ]
        local = torch.stack([v.detach().double().cpu() for v in values])
        if self.fabric.world_size > 1:
            local = self.fabric.all_reduce(local.to(self.fabric.device), reduce_op="sum").cpu()
        summed = local.tolist()
        losses_end, metrics_end = 3 + len(terms), 3 + len(terms) + len(keys)
        return {
            "count": summed[0],
            "tokens": summed[1],
            "nonfinite_grads": summed[2],
            "losses": dict(zip(terms, summed[3:losses_end])),
            "metrics": dict(zip(keys, summed[losses_end:metrics_end])),
            "metric_counts": dict(zip(count_keys, summed[metrics_end:])),
        }

    def _stop_if_not_finite(self, loss: float, totals: dict, grad_norm: Optional[float]) -> None:
        """Every rank sees the same totals, so every rank stops here together, before the optimiser step."""
        if math.isfinite(loss) and not totals["nonfinite_grads"]:
            return
        step = self.step + 1
        epoch, batch = divmod(self.step, max(1, self.loader.steps_per_epoch))
        what = (
            f"loss became {loss}"
            if not math.isfinite(loss)
            else f"gradient norm became {grad_norm if grad_norm is not None and not math.isfinite(grad_norm) else 'non-finite'}"
        )
        raise NonFiniteTraining(
            f"{what} at step {step} (epoch {epoch}, global batch {batch} of the epoch's order); stopped before that "
            f"step's optimiser update, so the weights and every saved checkpoint are those of step {self.step} "
            "(try a lower learning_rate, gradient clipping (max_grad_norm), or fp32/bf16 instead of fp16)"
        )

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The eval loss (with eval data) and the eval tasks' metrics (with task_eval), one record."""
        self.model.eval()
        record = {"step": self.step}
        if self.eval_loader is not None:
            record.update(self._eval_loss())
        if self.task_eval is not None:
            tasks = self.task_eval(self.model)
            self.task_metric_names = tuple(key.removeprefix("eval/") for key in tasks)
            record.update(tasks)
        return record

    def _eval_loss(self) -> dict:
        """Eval loss (and the stage's metrics) over every rank's share, weighted by the stage's count:
        sums are aggregated across ranks before dividing (train/metrics.py), never per-rank means."""
        from bumblecore.train.metrics import EvalAggregate

        aggregate = EvalAggregate(self.fabric.device)
        for batch, counted in in_lockstep(self.fabric, self.eval_loader):
            batch = self.fabric.to_device(batch)
            with self.fabric.autocast():
                loss_sum, metrics = self.stage.loss(self.model, batch)
            if counted:
                aggregate.update(loss_sum, self.stage.count(batch), metrics)
        names = sorted(aggregate.metrics)
        if self.fabric.world_size > 1:  # rank 0 always holds eval rows; a rank with none still joins every sync
            names = self.fabric.broadcast(names, src=0)
        values = aggregate.compute(names)
        record = {"eval/loss": values.pop("loss")}
        if getattr(self.stage, "reports_perplexity", True):
            record["eval/perplexity"] = math.exp(min(record["eval/loss"], 50.0))
        record.update({f"eval/{key}": value for key, value in values.items()})
        record = finish_record(self.stage, record)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(record["eval/loss"])
        return record

    def _evaluate_and_show(self, bar) -> dict:
        """Evaluate, record it in metrics.jsonl and print it as one line (rank 0), above the progress bar."""
        evaluation = self.evaluate()
        self.monitor.log(evaluation)
        headline = getattr(self.stage, "headline_metrics", ())
        line = eval_line(evaluation, self.settings.total_steps, headline, self.task_metric_names)
        if bar is not None:
            bar.write(line)  # tqdm clears the bar, prints the line and draws the bar again below it
        else:
            self.fabric.print(line)
        return evaluation

    def fit(self) -> list[dict]:
        settings = self.settings
        history: list[dict] = []
        bar = None
        if self.progress and self.fabric.is_global_zero:
            from tqdm.auto import tqdm

            bar = tqdm(total=settings.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        if self.evaluates and self.step == 0 and settings.eval_steps:
            history.append(self._evaluate_and_show(bar))  # the starting point, so the curve shows what training changed
        while self.step < settings.total_steps:
            record = self.train_step()
            if self.step % max(1, settings.logging_steps) == 0 or self.step == settings.total_steps:
                self.monitor.log(record)
                history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            at_end = settings.eval_at_end and self.step == settings.total_steps
            if self.evaluates and (
                (settings.eval_steps and self.step % settings.eval_steps == 0) or at_end
            ):  # before the step's checkpoint, which then holds what this evaluation did (a plateau schedule)
                history.append(self._evaluate_and_show(bar))
            if self.save_fn and settings.save_steps and self.step % settings.save_steps == 0:
                self.save_fn(self.step, False)
        if bar is not None:
            bar.close()
        if self.save_fn and settings.save_last:
            self.save_fn(self.step, True)
        return history


def eval_line(evaluation: dict, total_steps: int, headline: tuple = (), tasks: tuple = ()) -> str:
    """`eval step 172/172: loss 1.168, perplexity 3.216`: the eval loss and the stage's headline metrics
    (named as in metrics.jsonl, less `eval/`), then the eval tasks' metrics, four significant digits."""
    shown = [f"loss {evaluation['eval/loss']:.4g}"] if "eval/loss" in evaluation else []
    shown += [f"{key} {evaluation[f'eval/{key}']:.4g}" for key in (*headline, *tasks) if f"eval/{key}" in evaluation]
    return f"eval step {evaluation['step']}/{total_steps}: {', '.join(shown)}"


def in_lockstep(fabric, batches):
    """(batch, counted) for this rank's share (a sized iterable), then its last batch again (counted
    False) until every rank has run as many forwards as the rank with the most: under ZeRO-3 each
    forward gathers the parameters from all ranks, so a rank that stopped early would leave the
    others waiting. The counts are agreed before the first forward, as that gather is a collective too."""
    mine = len(batches)
    most = mine
    if fabric.world_size > 1:
        most = int(fabric.all_reduce(torch.tensor(float(mine), device=fabric.device), reduce_op="max"))
    if mine == 0 and most > 0:  # run.py refuses an eval set smaller than the world size before this
        raise ValueError("this rank has no eval rows while others do; give at least as many eval samples as processes")
    last = None
    for last in batches:
        yield last, True
    for _ in range(most - mine):
        yield last, False


def finish_record(stage, record: dict) -> dict:
    """A stage's metrics derived from the step's means (the reward model's standard deviations)."""
    finish = getattr(stage, "finish_record", None)
    return finish(record) if finish is not None else record


def as_terms(value) -> dict:
    """A stage's count or loss as {term: value}: a stage with one loss term gives it bare."""
    return value if isinstance(value, dict) else {"loss": value}


def weighted_sum(losses: dict, scales: dict) -> torch.Tensor:
    """sum_t losses[t] * scales[t], in the order of `scales`."""
    total = None
    for term, scale in scales.items():
        part = losses[term] * scale
        total = part if total is None else total + part
    return total
