"""GRPO: the objective on a fixed batch against the formula written out element by element (fp64),
loss and gradient, for each normalisation; reward functions from built-ins and a user's file, and the
errors a broken one gives."""

import math

import pytest
import torch

from bumblecore.train.grpo_loss import aggregate, group_advantages, token_terms
from bumblecore.train.rewards import load_reward_functions, score


def direct_loss(logps, old, ref, adv, mask, eps_low, eps_high, beta, loss_type, max_len):
    """The formula, one token at a time, in plain Python floats over the tensors' values."""
    per_sequence, total, tokens = [], 0.0, 0
    for i in range(len(logps)):
        s, n = 0.0, 0
        for t in range(len(logps[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logps[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            term = -min(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i][t] - logps[i][t]
                term += beta * (math.exp(d) - d - 1)
            s, n = s + term, n + 1
        per_sequence.append(s / max(n, 1))
        total, tokens = total + s, tokens + n
    if loss_type == "grpo":
        return sum(per_sequence) / len(per_sequence)
    if loss_type == "dapo":
        return total / tokens
    return total / (len(logps) * max_len)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    logps = -torch.rand(6, 5, generator=g, dtype=torch.float64) * 3
    old = logps + (torch.rand(6, 5, generator=g, dtype=torch.float64) - 0.5) * 0.6  # ratios inside and outside the clip
    ref = logps + (torch.rand(6, 5, generator=g, dtype=torch.float64) - 0.5)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    )
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, -1.0], dtype=torch.float64)
    return logps, old, ref, mask, rewards


def test_group_advantages_are_centred_and_scaled_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=3)
    first = torch.tensor([1.0, 0.0, 0.5])
    assert torch.allclose(adv[:3], (first - first.mean()) / (first.std() + 1e-4))
    assert torch.equal(adv[3:], torch.zeros(3))  # no spread: no signal
    assert torch.allclose(group_advantages(rewards, 3, scale_rewards=False)[:3], first - first.mean())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_the_formula(batch, loss_type, beta):
    logps, old, ref, mask, rewards = batch
    adv = group_advantages(rewards, group_size=3)
    eps_low, eps_high, max_len = 0.2, 0.28, 8
    leaf = logps.clone().requires_grad_(True)
    terms = token_terms(leaf, old, adv, mask, eps_low, eps_high, beta, ref)
    total, count = aggregate(terms.loss, mask, loss_type, max_len)
    loss = total / count
    loss.backward()

    def formula(values):
        rest = (old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), eps_low, eps_high, beta, loss_type, max_len)
        return direct_loss(values, *rest)

    assert loss.item() == pytest.approx(formula(logps.tolist()), rel=1e-12)
    # The gradient of the written-out formula, by central differences on every token's log-prob.
    h = 1e-6
    for i in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            up, down = logps.tolist(), logps.tolist()
            up[i][t] += h
            down[i][t] -= h
            numeric = (formula(up) - formula(down)) / (2 * h)
            assert leaf.grad[i, t].item() == pytest.approx(numeric, abs=1e-6), (i, t)
    assert terms.clipped.any() and not terms.clipped.all()


def test_first_iteration_has_ratio_one_and_no_clipping(batch):
    logps, _, _, mask, rewards = batch
    adv = group_advantages(rewards, 3)
    terms = token_terms(logps, logps, adv, mask, 0.2, 0.2)
    assert not terms.clipped.any()
    assert torch.allclose(terms.loss, -adv.unsqueeze(1) * mask)


def test_reward_functions_from_built_ins_and_a_user_file(tmp_path):
    file = tmp_path / "my_rewards.py"
    file.write_text(
        "def brevity(prompts, completions, answer, difficulty, **fields):\n"
        "    return [1.0 / (1 + len(c)) + d for c, d in zip(completions, difficulty)]\n"
    )
    functions = load_reward_functions(["exact_match", f"{file}:brevity"], [2.0, 1.0])
    prompts = ["How many: a b", "How many: a b", "Colour?"]
    completions = ["two", " Two\n", "blue sky"]
    fields = {"answer": ["two", "two", "red"], "difficulty": [0, 0, 1]}
    table, total = score(functions, prompts, completions, fields)
    assert table[0] == [1.0, 1.0, 0.0]
    assert table[1] == [1 / 4, 1 / 6, 1 / 9 + 1]
    assert total == [2 + 1 / 4, 2 + 1 / 6, 1 / 9 + 1]


def test_exact_match_takes_answer_else_alpacas_output():
    functions = load_reward_functions(["exact_match"])
    fields = {"answer": ["two", None], "output": ["three", "one"]}
    assert score(functions, [[], []], ["two", "ONE "], fields)[0] == [[1.0, 1.0]]
    with pytest.raises(ValueError, match="neither an `answer` nor an `output`"):
        score(functions, [[]], ["two"], {"id": [3]})


@pytest.mark.parametrize(
    "source, spec, message",
    [
        (None, "nope", "neither a built-in"),
        (None, "missing_file.py:f", "file missing_file.py does not exist"),
        (None, "no_such_module_xyz:f", "cannot import module no_such_module_xyz"),
        ("def g(prompts, completions, **k):\n    return [0.0]\n", "{file}:f", "has no function 'f'"),
        ("def f(prompts, completions, **k):\n    raise KeyError('answer')\n", "{file}:f", "raised KeyError"),
        ("def f(prompts, completions, **k):\n    return ['high']\n", "{file}:f", "returned 'high' for completion 0"),
        ("def f(prompts, completions, **k):\n    return [float('nan')]\n", "{file}:f", "returned nan"),
        (
            "def f(prompts, completions, **k):\n    return [1.0, 2.0]\n",
            "{file}:f",
            "returned 2 values for 1 completions",
        ),
        ("def f(prompts, completions, **k):\n    return 1.0\n", "{file}:f", "returned float"),
        ("def f(x):\n    return [1.0]\n", "{file}:f", "cannot be called as f(prompts=..."),
    ],
)
def test_a_broken_reward_function_is_a_clear_error_naming_it(tmp_path, monkeypatch, source, spec, message):
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "r.py"
    if source:
        file.write_text(source)
    spec = spec.format(file=file)
    with pytest.raises(ValueError, match="reward function") as err:
        functions = load_reward_functions([spec])
        score(functions, ["p"], ["c"], {})
    assert message in str(err.value) and spec.split(":")[0] in str(err.value)


def test_rloo_advantages_are_each_reward_minus_the_mean_of_the_others():
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0, -1.0, 0.5, 3.0])
    got = group_advantages(rewards, group_size=4, advantage="rloo")
    expected = [
        rewards[i] - sum(rewards[j] for j in range(g * 4, g * 4 + 4) if j != i) / 3
        for g in (0, 1)
        for i in range(g * 4, g * 4 + 4)
    ]
    assert torch.allclose(got, torch.stack(expected), atol=1e-6)
    assert got[0].item() == pytest.approx(-2 / 3)  # 0 - mean(1, 0, 1)
    assert torch.allclose(group_advantages(torch.ones(6), 3, advantage="rloo"), torch.zeros(6))  # no spread, no signal
    assert torch.equal(
        group_advantages(rewards, 1, advantage="rloo"), torch.zeros(8)
    )  # greedy evaluation's groups of one
