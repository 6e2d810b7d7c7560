"""The engine: a global batch gives the same update however it is split; resume continues exactly."""

import weakref

import pytest
import torch
from lightning.fabric import Fabric

from bumblecore import Bumblebee, BumblebeeConfig
from bumblecore.train.checkpoint import save_checkpoint
from bumblecore.train.engine import Engine, LoopSettings
from bumblecore.train.monitor import Monitor
from bumblecore.train.schedulers import build_scheduler
from bumblecore.train.sft import LanguageModelingStage

VOCAB = 64


def global_batches(num_steps, global_size=8, seq=12):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(num_steps):
        ids = torch.randint(0, VOCAB, (global_size, seq), generator=g)
        labels = ids.clone()
        lengths = torch.randint(3, seq + 1, (global_size,), generator=g)
        for row, n in enumerate(lengths):  # ragged targets: token weighting matters
            labels[row, n:] = -100
            labels[row, : int(n) // 3] = -100
        batches.append((ids, labels))
    return batches


class SplitLoader:
    """Serves global batch s as `accumulation` micro-batches (single device)."""

    def __init__(self, batches, accumulation):
        self.batches, self.accumulation = batches, accumulation
        self.steps_per_epoch = len(batches)

    def micro_batches(self, step):
        ids, labels = self.batches[step % len(self.batches)]
        return [
            {"input_ids": i, "labels": l} for i, l in zip(ids.chunk(self.accumulation), labels.chunk(self.accumulation))
        ]


def make_engine(tmp_path, accumulation, total_steps=4, seed=0, optimizer_class=torch.optim.AdamW):
    torch.manual_seed(seed)
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = Bumblebee(
        BumblebeeConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.1,
        )
    )
    optimizer = optimizer_class(model.parameters(), lr=1e-2, weight_decay=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = build_scheduler("cosine", optimizer, warmup_steps=1, total_steps=total_steps)
    loader = SplitLoader(global_batches(total_steps), accumulation)
    return Engine(
        fabric,
        model,
        optimizer,
        scheduler,
        LanguageModelingStage(),
        loader,
        LoopSettings(total_steps=total_steps, max_grad_norm=1.0),
        Monitor(tmp_path),
        progress=False,
    )


def params(engine):
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def test_split_into_micro_batches_does_not_change_the_update(tmp_path):
    results = []
    for accumulation in (1, 2, 4):
        # SGD: Adam would blow float noise in ~zero gradients (k_proj bias) up to full-size steps.
        engine = make_engine(tmp_path / str(accumulation), accumulation, optimizer_class=torch.optim.SGD)
        history = engine.fit()
        results.append(([r["loss"] for r in history], params(engine)))
    for losses, weights in results[1:]:
        assert losses == pytest.approx(results[0][0], rel=1e-5)
        for key in weights:
            torch.testing.assert_close(weights[key], results[0][1][key], rtol=1e-4, atol=1e-6)


def test_resume_continues_exactly(tmp_path):
    straight = make_engine(tmp_path / "a", accumulation=2, total_steps=6)
    expected = [r["loss"] for r in straight.fit()]

    first = make_engine(tmp_path / "b", accumulation=2, total_steps=6)
    first.settings.total_steps = 3
    losses = [r["loss"] for r in first.fit()]
    checkpoint = save_checkpoint(tmp_path / "b", "checkpoint-3", first.save_state, {"step": 3})

    resumed = make_engine(
        tmp_path / "c", accumulation=2, total_steps=6, seed=123
    )  # different init: must be overwritten
    resumed.load_state(checkpoint)
    assert resumed.step == 3
    losses += [r["loss"] for r in resumed.fit()]
    assert losses == expected
    for key, value in params(straight).items():
        assert torch.equal(value, params(resumed)[key])


def test_metrics_record_fields(tmp_path):
    engine = make_engine(tmp_path, accumulation=2, total_steps=2)
    record = engine.fit()[0]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec"} <= set(record)
    assert record["tokens"] == 8 * 12 and record["grad_norm"] > 0


def test_average_tokens_false_is_the_mean_of_micro_batch_means(tmp_path):
    """One process, 2 micro-batches of different target counts: the loss (and its gradient) is the mean
    over micro-batches of each one's token mean, the closed form computed here on the same weights."""
    engine = make_engine(tmp_path, accumulation=2, total_steps=1, optimizer_class=torch.optim.SGD)
    engine.settings.average_tokens_across_devices = False
    oracle = make_engine(tmp_path / "oracle", accumulation=2, total_steps=1).model  # the same initial weights
    engine.loader.batches[0][1][4:, :6] = -100  # the second micro-batch: far fewer targets
    stage, micro = LanguageModelingStage(), engine.loader.micro_batches(0)
    counts = [stage.count(b) for b in micro]
    assert counts[0] != counts[1]
    sums = [stage.loss(oracle, b)[0] for b in micro]
    expected = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
    expected.backward()
    expected_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in oracle.parameters() if p.grad is not None])
    )
    record = engine.fit()[0]
    assert record["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert record["grad_norm"] == pytest.approx(
        float(expected_norm), rel=1e-5
    )  # clip_gradients reports the norm before clipping
    token_mean = float((sums[0] + sums[1]) / sum(counts))
    assert abs(record["loss"] - token_mean) > 1e-3  # the default's definition would fail the check above


class TwoTermStage:
    """Each row's loss is a term of its own source (rows 0-2: `a`, the rest: `b`), weighted 0.5 and 2."""

    weights = {"a": 0.5, "b": 2.0}

    def _rows(self, batch):
        rows = batch["row"]
        return {"a": rows < 3, "b": rows >= 3}

    def count(self, batch):
        per_row = (batch["labels"][:, 1:] != -100).sum(-1)
        return {t: int(per_row[m].sum()) for t, m in self._rows(batch).items()}

    def loss(self, model, batch):
        logits = model(batch["input_ids"])[:, :-1].float()
        token = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=-100
        )
        per_row = token.sum(-1)
        return {t: self.weights[t] * per_row[m].sum() for t, m in self._rows(batch).items()}, {}


def test_several_loss_terms_are_each_divided_by_their_own_units_over_the_step(tmp_path):
    """2 micro-batches whose rows belong to two terms: the logged loss and the update are those of
    L = sum_t w_t S_t / N_t with S_t and N_t summed over the whole step, computed here directly."""
    engine = make_engine(tmp_path, accumulation=2, total_steps=1, optimizer_class=torch.optim.SGD)
    oracle = make_engine(tmp_path / "oracle", accumulation=2, total_steps=1).model
    engine.stage = TwoTermStage()
    split = engine.loader.micro_batches
    engine.loader.micro_batches = lambda step: [
        {**b, "row": torch.arange(4) + 4 * i} for i, b in enumerate(split(step))
    ]  # rows 0-3, then 4-7: term `a` lies in the first micro-batch, `b` in both
    ids, labels = engine.loader.batches[0]
    token = torch.nn.functional.cross_entropy(
        oracle(ids)[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100
    )
    counts = (labels[:, 1:] != -100).sum(-1)
    expected = 0.5 * token[:3].sum() / counts[:3].sum() + 2.0 * token[3:].sum() / counts[3:].sum()
    expected.backward()
    record = engine.fit()[0]
    assert record["loss"] == pytest.approx(float(expected), rel=1e-5)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in oracle.parameters() if p.grad is not None]))
    assert record["grad_norm"] == pytest.approx(float(norm), rel=1e-4)


class WatchedStage(LanguageModelingStage):
    """Records, at each micro-batch's loss, whether the previous micro-batch's loss tensor is still alive."""

    def __init__(self):
        self.previous, self.previous_alive = None, []

    def loss(self, model, batch):
        self.previous_alive.append(self.previous is not None and self.previous() is not None)
        total, metrics = super().loss(model, batch)
        self.previous = weakref.ref(total)
        return total, metrics


def test_each_micro_batch_graph_is_dropped_before_the_next_forward(tmp_path):
    """With gradient accumulation, nothing of a micro-batch's graph may outlive its backward: a held loss
    keeps what autograd's nodes hold (measured: the README's sft_lora line peaked ~450 MB higher)."""
    engine = make_engine(tmp_path, accumulation=4, total_steps=1)
    engine.stage = WatchedStage()
    engine.fit()
    assert engine.stage.previous_alive == [False, False, False, False]
