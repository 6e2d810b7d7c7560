"""THE training loop, shared by every stage.

forward -> loss -> backward -> accumulate -> clip -> step -> schedule -> log -> eval -> save.

A stage supplies two functions over its own batches:
    count(batch) -> int           how many units (target tokens, pairs) the batch's loss sums over
    loss(model, batch) -> (sum, metrics)   the summed loss and summed metrics, as tensors
A stage with several loss terms (a mixture with loss weights: one per source) gives count a dict
{term: units} and loss a dict {term: summed, weighted loss}, the same names in the same order on every
rank; the engine divides each term by its own units over the step and adds them:
L = sum_t sum_t / units_t (docs/CONFIG.md, "Mixtures and loss weights").
A metric is a sum the engine divides by the step's count like the loss, or a (sum, count) pair for a
mean over units of its own (KTO's rewards of its desirable examples): the sums and the counts are
added over the step (and ranks) and divided once; a step with none of those units does not log it.
The engine divides by the count of the whole optimiser step, across accumulation steps and
devices, so a global batch gives the same update however it is split. With
average_tokens_across_devices false it is the original's loss instead: the mean over the step's
micro-batches (all ranks') of each micro-batch's own mean, count(micro-batch) units each.

The loader supplies, for optimiser step s, this rank's micro-batches: `micro_batches(s)`; its
position is the step number, so resuming restores it without replaying data.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from bumblecore.train.checkpoint import STATE_DIR, restore_rng_state, rng_state
from bumblecore.train.runtime import deepspeed_engine, runtime_grad_norm, runtime_keeps_no_grad_norm
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
    runtime_owns_accumulation: bool = False
    """DeepSpeed: the engine object scales by 1/accumulation, clips and steps at the boundary itself."""
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
    ):
        self.fabric, self.model, self.optimizer, self.scheduler = fabric, model, optimizer, scheduler
        self.stage, self.loader, self.settings, self.monitor = stage, loader, settings, monitor
        self.save_fn, self.eval_loader, self.progress = save_fn, eval_loader, progress
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

    def _global_sum(self, value: float) -> float:
        if self.fabric.world_size == 1:
            return value
        total = self.fabric.all_reduce(torch.tensor(float(value), device=self.fabric.device), reduce_op="sum")
        return float(total)

    def train_step(self) -> dict:
        """One optimiser step over this rank's micro-batches; returns the step's metrics.

        The step's sums (target count, tokens, loss, metrics) and a flag for non-finite gradients are
        all-reduced once, before the optimiser step, so every rank stops together on a non-finite
        loss or gradient norm and nothing non-finite ever reaches the weights."""
        settings, fabric = self.settings, self.fabric
        started = time.perf_counter()
        micro_batches = self.loader.micro_batches(self.step)
        counts = [self.stage.count(b) for b in micro_batches]
        per_micro_mean = not settings.average_tokens_across_devices
        terms = list(counts[0]) if isinstance(counts[0], dict) else None
        if terms:  # each term over its own units
            scales, report_weights, divided = self._term_scales(counts, terms, per_micro_mean)
            local_count = sum(c[terms[0]] for c in counts)  # what the stage's plain metrics are divided by
        else:
            divided = True  # the reported loss sum is divided by the step's count below
            local_count = sum(counts)
            if per_micro_mean:
                # The original's loss: the mean over the step's micro-batches (of every rank) of each one's own
                # mean over its units; DDP's gradient average over ranks supplies the 1/world_size.
                scales = [1.0 / (max(1, c) * len(micro_batches)) for c in counts]
            else:
                denominator = max(1.0, self._global_sum(local_count))
                # DDP averages gradients over ranks; multiplying back makes the result a global sum / global count.
                scales = [fabric.world_size / denominator] * len(micro_batches)
            # The report sums what the step averages: units, or each micro-batch's mean (x 1.0 is exact).
            report_weights = [1.0 / max(1, c) if per_micro_mean else 1.0 for c in counts]
        report_count = len(micro_batches) if per_micro_mean else local_count  # what the reported sums are divided by
        if settings.runtime_owns_accumulation:  # DeepSpeed divides by its accumulation steps again
            n = len(micro_batches)
            scales = [{t: v * n for t, v in s.items()} if terms else s * n for s in scales]

        self.model.train()
        loss_total = torch.zeros((), device=fabric.device)
        metric_totals: dict[str, torch.Tensor] = {}
        metric_counts: dict[str, torch.Tensor] = {}  # the own units of (sum, count) metrics
        tokens = 0
        own_norm = float("nan")
        totals = None
        for index, batch in enumerate(micro_batches):
            batch = fabric.to_device(batch)
            last = index == len(micro_batches) - 1
            # DDP: all-reduce gradients only on the last micro-batch; DeepSpeed does its own accumulation.
            skip_sync = (
                contextlib.nullcontext()
                if settings.runtime_owns_accumulation
                else fabric.no_backward_sync(self.model, enabled=not last)
            )
            with skip_sync:
                with fabric.autocast():  # the stage may apply the LM head outside the wrapped forward
                    loss_sum, metrics = self.stage.loss(self.model, batch)
                if terms:
                    fabric.backward(sum(loss_sum[t] * scales[index][t] for t in terms))
                else:
                    fabric.backward(loss_sum * scales[index])
            if terms:
                loss_total += sum(loss_sum[t].detach() * report_weights[index][t] for t in terms)
                weight = 1.0 / max(1, counts[index][terms[0]]) if per_micro_mean else 1.0
            else:
                weight = report_weights[index]
                loss_total += loss_sum.detach() * weight
            for key, value in metrics.items():
                if isinstance(value, tuple):  # a mean over units of its own: plain sums in either loss mode
                    metric_counts[key] = metric_counts.get(key, 0) + torch.as_tensor(value[1]).detach()
                    metric_totals[key] = metric_totals.get(key, 0) + value[0].detach()
                else:
                    metric_totals[key] = metric_totals.get(key, 0) + value.detach() * weight
            tokens += int(batch.get("num_tokens", batch["input_ids"].numel()))
            if settings.runtime_owns_accumulation:
                if last:  # the accumulation boundary: DeepSpeed's step below is the real one
                    if runtime_keeps_no_grad_norm(self.model):  # ZeRO-0 in fp32: DeepSpeed clips but keeps no norm
                        own_norm = float(_grad_norm(self.model))
                        finite = math.isfinite(own_norm)
                    else:
                        finite = settings.skips_overflow_steps or _deepspeed_grads_finite(self.model)
                    totals = self._step_totals(report_count, tokens, loss_total, metric_totals, metric_counts, finite)
                    self._stop_if_not_finite(totals, None if finite else own_norm, divided)
                # The engine's own step after every micro-batch, as DeepSpeed requires: it counts them, and
                # only at the boundary reduces, clips and updates. (Fabric's optimizer.step() would call the
                # ZeRO optimizer directly, skipping that count: it would update after every micro-batch.)
                deepspeed_engine(self.model).step()

        if settings.runtime_owns_accumulation:
            reported = runtime_grad_norm(self.model)
            grad_norm = reported if reported is not None else own_norm
        else:
            if settings.max_grad_norm:
                grad_norm = float(
                    fabric.clip_gradients(
                        self.model, self.optimizer, max_norm=settings.max_grad_norm, error_if_nonfinite=False
                    )
                )
            else:
                grad_norm = float(_grad_norm(self.model))
            # fp16 with a grad scaler: an overflowing step is skipped by the scaler, not a divergence.
            finite = settings.skips_overflow_steps or math.isfinite(grad_norm)
            totals = self._step_totals(report_count, tokens, loss_total, metric_totals, metric_counts, finite)
            self._stop_if_not_finite(totals, grad_norm, divided)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        self.step += 1

        global_count = max(1.0, totals["count"])
        global_tokens = int(totals["tokens"])
        self.tokens_seen += global_tokens
        elapsed = time.perf_counter() - started
        record = {
            "step": self.step,
            "epoch": round(self.step / max(1, self.loader.steps_per_epoch), 4),
            "loss": totals["loss"] / global_count if divided else totals["loss"],
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
        return record

    def _step_totals(
        self, count: int, tokens: int, loss_total, metric_totals: dict, metric_counts: dict, grads_finite: bool
    ) -> dict:
        """The step's sums over every rank, in one all-reduce (none on a single process)."""
        keys, count_keys = sorted(metric_totals), sorted(metric_counts)
        if self.fabric.world_size == 1:
            return {
                "count": float(count),
                "tokens": float(tokens),
                "loss": float(loss_total),
                "nonfinite_grads": 0.0 if grads_finite else 1.0,
                "metrics": {k: float(metric_totals[k]) for k in keys},
                "metric_counts": {k: float(metric_counts[k]) for k in count_keys},
            }
        local = torch.stack(
            [
                torch.tensor(float(count), dtype=torch.float64),
                torch.tensor(float(tokens), dtype=torch.float64),
                loss_total.detach().double().cpu(),
                torch.tensor(0.0 if grads_finite else 1.0, dtype=torch.float64),
                *[torch.as_tensor(metric_totals[k]).detach().double().cpu() for k in keys],
                *[torch.as_tensor(metric_counts[k]).detach().double().cpu() for k in count_keys],
            ]
        )
        summed = self.fabric.all_reduce(local.to(self.fabric.device), reduce_op="sum").cpu().tolist()
        return {
            "count": summed[0],
            "tokens": summed[1],
            "loss": summed[2],
            "nonfinite_grads": summed[3],
            "metrics": dict(zip(keys, summed[4 : 4 + len(keys)])),
            "metric_counts": dict(zip(count_keys, summed[4 + len(keys) :])),
        }

    def _term_scales(self, counts: list[dict], terms: list[str], per_micro_mean: bool):
        """Per micro-batch, each term's gradient scale and report weight, and whether the reported loss
        sum still needs dividing by the step's count: each term over its own units of the whole step
        (every micro-batch of every rank, all-reduced in one go), or of each micro-batch (the original's mean)."""
        n, world = len(counts), self.fabric.world_size
        if per_micro_mean:
            report = [{t: 1.0 / max(1, c[t]) for t in terms} for c in counts]
            return [{t: w / n for t, w in r.items()} for r in report], report, True
        local = torch.tensor([float(sum(c[t] for c in counts)) for t in terms], dtype=torch.float64)
        if world > 1:
            local = self.fabric.all_reduce(local.to(self.fabric.device), reduce_op="sum").cpu()
        units = {t: max(1.0, float(u)) for t, u in zip(terms, local.tolist())}
        return [{t: world / units[t] for t in terms}] * n, [{t: 1.0 / units[t] for t in terms}] * n, False

    def _stop_if_not_finite(self, totals: dict, grad_norm: Optional[float], divided: bool = True) -> None:
        """Every rank sees the same totals, so every rank stops here together, before the optimiser step."""
        loss = totals["loss"] / max(1.0, totals["count"]) if divided else totals["loss"]
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
        """Eval loss (and the stage's metrics) over every rank's share, weighted by the stage's count:
        sums are aggregated across ranks before dividing (train/metrics.py), never per-rank means."""
        from bumblecore.train.metrics import EvalAggregate

        self.model.eval()
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
        record = {"step": self.step, "eval/loss": values.pop("loss")}
        if getattr(self.stage, "reports_perplexity", True):
            record["eval/perplexity"] = math.exp(min(record["eval/loss"], 50.0))
        record.update({f"eval/{key}": value for key, value in values.items()})
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(record["eval/loss"])
        return record

    def _evaluate_and_show(self, bar) -> dict:
        """Evaluate, record it in metrics.jsonl and print it as one line (rank 0), above the progress bar."""
        evaluation = self.evaluate()
        self.monitor.log(evaluation)
        line = eval_line(evaluation, self.settings.total_steps, getattr(self.stage, "headline_metrics", ()))
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
        if self.eval_loader is not None and self.step == 0 and settings.eval_steps:
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
            if self.eval_loader is not None and (
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


def eval_line(evaluation: dict, total_steps: int, headline: tuple = ()) -> str:
    """`eval step 172/172: loss 1.168, perplexity 3.216`: the eval loss and the stage's headline metrics
    (named as in metrics.jsonl, less `eval/`), four significant digits."""
    shown = [f"loss {evaluation['eval/loss']:.4g}"]
    shown += [f"{key} {evaluation[f'eval/{key}']:.4g}" for key in headline if f"eval/{key}" in evaluation]
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


def _deepspeed_grads_finite(model) -> bool:
    """Whether this rank's share of the accumulated gradients is finite, read after DeepSpeed's last
    backward of the step and before its step() (which would apply them): the ZeRO-1/2 partitions it
    is about to step, ZeRO-3's local fp32 partitions, or the plain gradients without ZeRO."""
    engine = deepspeed_engine(model)
    optimizer = getattr(engine, "optimizer", None)
    if engine.zero_optimization_stage() == 3:
        from deepspeed.utils import safe_get_local_grad

        grads = [safe_get_local_grad(p) for p in engine.module.parameters() if p.requires_grad]
    elif isinstance(getattr(optimizer, "averaged_gradients", None), dict):
        grads = [g for group in optimizer.averaged_gradients.values() for g in (group or [])]
    else:
        grads = [
            getattr(p, "_hp_grad", None) if getattr(p, "_hp_grad", None) is not None else p.grad
            for p in engine.module.parameters()
            if p.requires_grad
        ]
    grads = [g for g in grads if g is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _grad_norm(model) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
