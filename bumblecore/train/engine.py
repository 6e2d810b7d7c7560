"""THE training loop, shared by every stage.

forward -> loss -> backward -> accumulate -> clip -> step -> schedule -> log -> eval -> save.

A stage supplies two functions over its own batches:
    count(batch) -> int           how many units (target tokens, pairs) the batch's loss sums over
    loss(model, batch) -> (sum, metrics)   the summed loss and summed metrics, as tensors
The engine divides by the count of the whole optimiser step, across accumulation steps and
devices, so a global batch gives the same update however it is split.

The loader supplies, for optimiser step s, this rank's micro-batches: `micro_batches(s)`; its
position is the step number, so resuming restores it without replaying data.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch

from bumblecore.train.checkpoint import STATE_DIR, restore_rng_state, rng_state
from bumblecore.train.runtime import runtime_grad_norm, runtime_skips_clipping


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
    save_steps: Optional[int] = None
    save_total_limit: Optional[int] = 3
    save_last: bool = False
    average_tokens_across_devices: bool = True
    runtime_owns_accumulation: bool = False
    """DeepSpeed: the engine object scales by 1/accumulation, clips and steps at the boundary itself."""
    extra_state: dict = field(default_factory=dict)


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
        }

    def save_state(self, directory) -> None:
        self.fabric.save(f"{directory}/{STATE_DIR}", self.state())

    def load_state(self, directory) -> None:
        state = {"model": self.model, "optimizer": self.optimizer}
        rest = self.fabric.load(f"{directory}/{STATE_DIR}", state)
        self.scheduler.load_state_dict(rest["scheduler"])
        self.step, self.tokens_seen = rest["step"], rest["tokens_seen"]
        restore_rng_state(rest["rng"])

    # ------------------------------------------------------------------ loop

    def _global_sum(self, value: float) -> float:
        if self.fabric.world_size == 1:
            return value
        total = self.fabric.all_reduce(torch.tensor(float(value), device=self.fabric.device), reduce_op="sum")
        return float(total)

    def train_step(self) -> dict:
        """One optimiser step over this rank's micro-batches; returns the step's metrics."""
        settings, fabric = self.settings, self.fabric
        started = time.perf_counter()
        micro_batches = self.loader.micro_batches(self.step)
        local_count = sum(self.stage.count(b) for b in micro_batches)
        if settings.average_tokens_across_devices:
            denominator = max(1.0, self._global_sum(local_count))
            # DDP averages gradients over ranks; multiplying back makes the result a global sum / global count.
            scale = fabric.world_size / denominator
        else:
            scale = 1.0 / max(1, local_count)  # the original: each rank's own mean
        if settings.runtime_owns_accumulation:
            scale *= len(micro_batches)  # DeepSpeed divides by its accumulation steps again

        self.model.train()
        loss_total = torch.zeros((), device=fabric.device)
        metric_totals: dict[str, torch.Tensor] = {}
        tokens = 0
        own_norm = float("nan")
        for index, batch in enumerate(micro_batches):
            batch = fabric.to_device(batch)
            last = index == len(micro_batches) - 1
            # DDP: all-reduce gradients only on the last micro-batch; DeepSpeed does its own accumulation.
            skip_sync = (contextlib.nullcontext() if settings.runtime_owns_accumulation
                         else fabric.no_backward_sync(self.model, enabled=not last))
            with skip_sync:
                with fabric.autocast():  # the stage may apply the LM head outside the wrapped forward
                    loss_sum, metrics = self.stage.loss(self.model, batch)
                fabric.backward(loss_sum * scale)
            if settings.runtime_owns_accumulation:
                if last and runtime_skips_clipping(self.model):  # ZeRO-0 in fp32: DeepSpeed neither clips nor keeps a norm
                    own_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.max_grad_norm)
                                     if settings.max_grad_norm else _grad_norm(self.model))
                self.optimizer.step()  # DeepSpeed: a real step only at the accumulation boundary
            loss_total += loss_sum.detach()
            for key, value in metrics.items():
                metric_totals[key] = metric_totals.get(key, 0) + value.detach()
            tokens += int(batch.get("num_tokens", batch["input_ids"].numel()))

        if settings.runtime_owns_accumulation:
            reported = runtime_grad_norm(self.model)
            grad_norm = reported if reported is not None else own_norm
        else:
            if settings.max_grad_norm:
                grad_norm = float(fabric.clip_gradients(self.model, self.optimizer, max_norm=settings.max_grad_norm))
            else:
                grad_norm = float(_grad_norm(self.model))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        self.step += 1

        global_count = max(1.0, self._global_sum(local_count))
        global_tokens = int(self._global_sum(tokens))
        self.tokens_seen += global_tokens
        loss_value = self._global_sum(float(loss_total)) / global_count
        if not math.isfinite(loss_value):
            epoch, batch = divmod(self.step - 1, max(1, self.loader.steps_per_epoch))
            raise FloatingPointError(
                f"loss became {loss_value} at step {self.step} (epoch {epoch}, global batch {batch} of the epoch's order); "
                "stopping before the weights are ruined (try a lower learning_rate, fp32 or bf16 instead of fp16)")
        elapsed = time.perf_counter() - started
        record = {
            "step": self.step,
            "epoch": round(self.step / max(1, self.loader.steps_per_epoch), 4),
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": global_tokens,
            "tokens_per_sec": global_tokens / elapsed if elapsed > 0 else 0.0,
        }
        for key, value in metric_totals.items():
            record[key] = self._global_sum(float(value)) / global_count
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        loss_total, count = 0.0, 0
        metric_totals: dict[str, float] = {}
        for batch in self.eval_loader:
            batch = self.fabric.to_device(batch)
            with self.fabric.autocast():
                loss_sum, metrics = self.stage.loss(self.model, batch)
            loss_total += float(loss_sum)
            count += self.stage.count(batch)
            for key, value in metrics.items():
                metric_totals[key] = metric_totals.get(key, 0.0) + float(value)
        count = max(1.0, self._global_sum(count))
        record = {"step": self.step, "eval/loss": self._global_sum(loss_total) / count}
        if getattr(self.stage, "reports_perplexity", True):
            record["eval/perplexity"] = math.exp(min(record["eval/loss"], 50.0))
        for key, value in metric_totals.items():
            record[f"eval/{key}"] = self._global_sum(value) / count
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(record["eval/loss"])
        return record

    def fit(self) -> list[dict]:
        settings = self.settings
        history: list[dict] = []
        bar = None
        if self.progress and self.fabric.is_global_zero:
            from tqdm.auto import tqdm

            bar = tqdm(total=settings.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        if self.eval_loader is not None and self.step == 0 and settings.eval_steps:
            evaluation = self.evaluate()  # the starting point, so the curve shows what training changed
            self.monitor.log(evaluation)
            history.append(evaluation)
        while self.step < settings.total_steps:
            record = self.train_step()
            if self.step % max(1, settings.logging_steps) == 0 or self.step == settings.total_steps:
                self.monitor.log(record)
                history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if self.eval_loader is not None and settings.eval_steps and self.step % settings.eval_steps == 0:
                evaluation = self.evaluate()
                self.monitor.log(evaluation)
                history.append(evaluation)
            if self.save_fn and settings.save_steps and self.step % settings.save_steps == 0:
                self.save_fn(self.step, False)
        if bar is not None:
            bar.close()
        if self.save_fn and settings.save_last:
            self.save_fn(self.step, True)
        return history


def _grad_norm(model) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
