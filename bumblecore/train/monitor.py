"""What a run shows and keeps: metrics.jsonl, the experiment trackers of `report_to` (TensorBoard, W&B,
MLflow, CSV: train/trackers.py), logs/train.log, PNG curves at the end.

Only rank 0 writes. Every logged optimiser step is one JSON line in metrics.jsonl, so the whole
history can be read back (and plotted again) with nothing but `json`; each tracker gets the same values.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

PLOTTED_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "reward")
# A preference loss's own parts, logged by every run of its stage (train/dpo.py): terms of one loss, not
# sources, so they alone make no loss_per_source.png; beside a mixture's sources they are drawn with them.
PREFERENCE_LOSS_TERMS = frozenset({"loss/dpo", "loss/ipo", "loss/simpo", "loss/orpo", "loss/nll", "loss/sft"})


class Monitor:
    def __init__(
        self,
        output_dir,
        report_to: Sequence[str] = (),
        save_train_log: bool = False,
        is_rank_zero: bool = True,
        resume_step: Optional[int] = None,
        hyperparameters: Optional[dict] = None,
        run_name: Optional[str] = None,
        tracker_project: str = "bumblecore",
    ):
        """`hyperparameters`: the resolved configuration each tracker records (training_args.yaml's keys)."""
        self.output_dir = Path(output_dir)
        self.enabled = is_rank_zero
        self.metrics_file = self.output_dir / "metrics.jsonl"
        self.logger = logging.getLogger("bumblecore.train")
        self.trackers = None
        self.log_handler = None
        self.previous_sigterm, self.writing, self.stop_signal = None, False, None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.metrics_file.exists():
            self.metrics_file.unlink()  # a fresh run starts a fresh history
        if save_train_log:
            (self.output_dir / "logs").mkdir(exist_ok=True)
            self.log_handler = logging.FileHandler(self.output_dir / "logs" / "train.log", encoding="utf-8")
            self.log_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self.logger.addHandler(self.log_handler)
            self.logger.setLevel(logging.INFO)
        if report_to:
            from bumblecore.train.trackers import Trackers

            self.trackers = Trackers(
                list(report_to), self.output_dir, hyperparameters or {}, run_name, tracker_project, resume_step
            )
            if threading.current_thread() is threading.main_thread():
                self.previous_sigterm = signal.signal(signal.SIGTERM, self._stop_on_sigterm)

    def _stop_on_sigterm(self, signum, frame) -> None:
        """SIGTERM (a scheduler's stop, `kill`) would end the process with the trackers' runs left open: it
        stops the run as Ctrl+C does instead, through the same close (status killed), and not in the middle
        of a record, which reaches metrics.jsonl and every tracker whole."""
        if self.writing:
            self.stop_signal = signum
        else:
            raise SystemExit(128 + signum)  # the exit status a shell reports for a signal

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines the resumed run will write again (steps after the checkpoint)."""
        if not self.metrics_file.exists():
            return
        kept = [
            line
            for line in self.metrics_file.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.metrics_file.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def info(self, message: str) -> None:
        if self.enabled:
            self.logger.info(message)

    def log(self, metrics: dict) -> None:
        """One record: at least step, and whatever the stage measured (loss, lr, grad_norm, tokens, ...)."""
        if not self.enabled:
            return
        record = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in metrics.items()}
        self.writing = True
        try:
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.trackers is not None:  # the values metrics.jsonl holds, so the two agree exactly
                self.trackers.log(record)
        finally:
            self.writing = False
        self.logger.info(json.dumps(record))
        if self.stop_signal is not None:
            raise SystemExit(128 + self.stop_signal)

    def plot(self, smooth: bool = True) -> None:
        """Write the PNG curves from the history so far (at each save and at the end)."""
        if self.enabled and self.metrics_file.exists():
            plot_history(read_history(self.metrics_file), self.output_dir, smooth=smooth)

    def close(self, smooth: bool = True, error: Optional[BaseException] = None) -> None:
        """At the run's end, or on its way out with `error`: the trackers record the run as failed (an
        exception) or killed (an interrupt), where they keep a state."""
        if not self.enabled:
            return
        if self.trackers is not None:
            status = "success" if error is None else "failed" if isinstance(error, Exception) else "killed"
            trackers, self.trackers = self.trackers, None
            self.writing = True  # a SIGTERM now waits: the run is on its way out already
            try:
                trackers.close(status)
            finally:
                if self.previous_sigterm is not None:
                    signal.signal(signal.SIGTERM, self.previous_sigterm)
                    self.previous_sigterm = None
        if self.log_handler is not None:
            self.logger.removeHandler(self.log_handler)
            self.log_handler.close()
        self.plot(smooth)


def read_history(metrics_file) -> list[dict]:
    return [json.loads(line) for line in Path(metrics_file).read_text(encoding="utf-8").splitlines() if line.strip()]


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style smoothing)."""
    out, running = [], 0.0
    for i, value in enumerate(values, 1):
        running = weight * running + (1 - weight) * value
        out.append(running / (1 - weight**i))
    return out


def plot_history(history: list[dict], output_dir, smooth: bool = True) -> list[Path]:
    """training_loss.png (with eval loss when present), one PNG per DPO reward metric, GRPO's reward and,
    for a mixture, loss_per_source.png (every loss/<name> and eval/loss/<name>)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def series(key):
        points = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    def figure(key, title, file_name, eval_key=None):
        steps, values = series(key)
        if not steps:
            return
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(steps, values, alpha=0.35 if smooth and len(values) > 1 else 1.0, label=key)
        if smooth and len(values) > 1:
            ax.plot(steps, ema(values), label=f"{key} (smoothed)")
        if eval_key:
            eval_steps, eval_values = series(eval_key)
            if eval_steps:
                ax.plot(eval_steps, eval_values, "o-", label=eval_key)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(output_dir) / file_name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    figure("loss", "training loss", "training_loss.png", eval_key="eval/loss")
    for key in PLOTTED_METRICS:
        figure(key, key, key.replace("/", "_") + ".png", eval_key=f"eval/{key}")
    # A mixture's per-source losses (loss/<name>), train and eval, in one figure.
    per_source = sorted({k for r in history for k in r if k.startswith(("loss/", "eval/loss/"))})
    if set(per_source) - PREFERENCE_LOSS_TERMS:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key in per_source:
            steps, values = series(key)
            evaluated = key.startswith("eval/")
            ax.plot(steps, ema(values) if smooth and not evaluated and len(values) > 1 else values,
                    "o-" if evaluated else "-", label=key)  # fmt: skip
        ax.set_xlabel("step")
        ax.set_title("loss per source" + (" (train smoothed)" if smooth else ""))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(output_dir) / "loss_per_source.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
