"""Reward functions for GRPO: the built-ins and the user's own, named in the config.

A reward function takes the round's prompts (each a list of messages, `[{"role": "user", "content": ...}]`)
and completions (strings), one entry per completion, and, as keyword arguments, the other fields of
each completion's record (`answer=[...]`, ...; None where a record lacks the field), and returns one
number per completion. `reward_functions: [exact_match, my_rewards.py:brevity]` names them:
a built-in by name, else `module:function` (an importable module) or `path/to/file.py:function`.

A reward model (`reward_models: [dir, ...]`, trained by training_stage rm) is one more reward beside
them: it scores each prompt's messages plus an assistant message holding the completion, rendered whole
with the reward model's own tokenizer and chat template (inference/scoring.py, as `bumblecore score`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


def normalised_answer(text: str) -> str:
    """What exact match compares: the text without surrounding whitespace, case folded."""
    return " ".join(str(text).split()).casefold()


def exact_match(
    prompts: list, completions: list[str], answer: Optional[list] = None, output: Optional[list] = None, **fields
) -> list[float]:
    """1.0 where the completion is the record's `answer` (whitespace and case aside), else 0.0. A record
    without `answer` is compared with its Alpaca `output`, so SFT data with short answers serves as is."""
    expected = [
        a if a is not None else o
        for a, o in zip(answer or [None] * len(completions), output or [None] * len(completions))
    ]
    if any(e is None for e in expected):
        raise ValueError("a record has neither an `answer` nor an `output` field for exact_match to compare with")
    return [float(normalised_answer(c) == normalised_answer(e)) for c, e in zip(completions, expected)]


SINGLE_LINE = re.compile(r"\S[^\n]*")


def single_line(prompts: list, completions: list[str], **fields) -> list[float]:
    """A format check: 1.0 for a non-empty answer on one line (what the demo's questions expect), else 0.0."""
    return [float(bool(SINGLE_LINE.fullmatch(c.strip()))) for c in completions]


BUILT_IN = {"exact_match": exact_match, "single_line": single_line}


@dataclass
class RewardFunction:
    name: str
    """As the config names it (`exact_match`, `rewards.py:brevity`)."""
    function: Callable
    weight: float = 1.0

    @property
    def is_model(self) -> bool:
        """A reward model (its name is its directory)."""
        return isinstance(self.function, ModelReward)

    def __call__(self, prompts: list, completions: list[str], fields: dict[str, list]) -> list[float]:
        try:
            values = self.function(prompts=prompts, completions=completions, **fields)
        except Exception as err:
            raise ValueError(f"reward function {self.name} raised {type(err).__name__}: {err}") from err
        try:
            values = list(values)
        except TypeError:
            raise ValueError(
                f"reward function {self.name} returned {type(values).__name__}; "
                f"expected a list of {len(completions)} numbers"
            ) from None
        if len(values) != len(completions):
            raise ValueError(
                f"reward function {self.name} returned {len(values)} values for {len(completions)} completions"
            )
        rewards = []
        for index, value in enumerate(values):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(
                    f"reward function {self.name} returned {value!r} for completion {index}; expected a finite number"
                )
            rewards.append(float(value))
        return rewards


def load_function(spec: str) -> Callable:
    """A built-in by name, `module:function`, or `file.py:function` (relative to the working directory)."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    if ":" not in spec:
        raise ValueError(
            f"reward function {spec!r} is neither a built-in ({', '.join(BUILT_IN)}) "
            "nor of the form module:function or file.py:function"
        )
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"reward function {spec}: file {where} does not exist")
        module_name = f"bumblecore_rewards_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            loader.loader.exec_module(module)
        except Exception as err:
            raise ValueError(f"reward function {spec}: importing {where} raised {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"reward function {spec}: cannot import module {where} ({err})") from err
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"reward function {spec}: {where} has no function {name!r}")
    try:
        inspect.signature(function).bind_partial(prompts=[], completions=[])
    except TypeError as err:
        raise ValueError(
            f"reward function {spec} cannot be called as f(prompts=..., completions=..., **fields): {err}"
        ) from None
    return function


def load_reward_functions(
    specs: list[str], weights: Optional[list[float]] = None, models: Optional[list] = None
) -> list[RewardFunction]:
    """The functions of `specs`, then the reward models `models` (loaded: RewardScorer), weighted in that
    order (TRL's: one weight per function, then one per model)."""
    models = models or []
    if not specs and not models:
        raise ValueError("training_stage grpo needs reward_functions (e.g. [exact_match] or [my_rewards.py:score])")
    if weights is not None and len(weights) != len(specs) + len(models):
        raise ValueError(
            f"reward_weights has {len(weights)} values for {len(specs)} reward_functions and {len(models)} reward_models"
        )
    weights = [1.0] * (len(specs) + len(models)) if weights is None else [float(w) for w in weights]
    functions = [RewardFunction(spec, load_function(spec), w) for spec, w in zip(specs, weights)]
    scored = [RewardFunction(model.path, ModelReward(model), w) for model, w in zip(models, weights[len(specs) :])]
    return functions + scored


class ModelReward:
    """A reward model as a reward function: the prompt's messages + the completion as the assistant's reply."""

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, prompts: list, completions: list[str], **fields) -> list[float]:
        return self.scorer([list(p) + [{"role": "assistant", "content": c}] for p, c in zip(prompts, completions)])


def score(functions: list[RewardFunction], prompts: list, completions: list[str], fields: dict[str, list]):
    """(per-function rewards [functions x completions], weighted total per completion)."""
    table = [function(prompts, completions, fields) for function in functions]
    total = [sum(f.weight * column[i] for f, column in zip(functions, table)) for i in range(len(completions))]
    return table, total


def reward_scorer(path: str, run, device: str):
    """A reward model of `reward_models` on this process's device, in the policy's precision, scoring a
    micro-batch at a time."""
    from bumblecore.inference.scoring import RewardScorer

    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(run.optimization.train_model_precision, "float32")
    batch_size = run.optimization.train_micro_batch_size_per_gpu
    try:
        return RewardScorer(path, dtype, device, batch_size, run.model.trust_remote_code)
    except (ValueError, OSError) as err:
        raise ValueError(f"reward_models: {err}") from err


def reward_names(functions: list[RewardFunction]) -> list[str]:
    """Short metric names: `exact_match`, `brevity` for rewards.py:brevity, `rm` for a reward model in
    checkpoints/rm (a repeat gets its index)."""
    names = []
    for index, function in enumerate(functions):
        name = Path(function.name).name if function.is_model else function.name.rsplit(":", 1)[-1]
        names.append(name if name not in names else f"{name}_{index}")
    return names
