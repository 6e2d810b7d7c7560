"""Our model inside lm-evaluation-harness: `BumblecoreLM`, registered as lm-eval's model "bumblecore".

lm-eval asks three things of a model, each a list of requests: `loglikelihood` (the log-probability of
a continuation after a context, and whether greedy decoding would produce it), `loglikelihood_rolling`
(a whole text, for perplexity) and `generate_until` (greedy text up to a stop string). Texts become
tokens the way lm-eval's own Hugging Face backend (`HFLM`) makes them, so the numbers are the same for
the same checkpoint (tests/inference/test_harness.py holds ours to HFLM's): `TemplateLM` splits each
(context, continuation) pair, the tokenizer adds its own special tokens (its BOS) to a context unless
the text starts with it already, and an empty context is the prefix token (BOS, else EOS). Generation
runs our engine (inference/generate.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from bumblecore.inference.generate import GenerationEngine, SamplingParams
from bumblecore.inference.loading import load_for_inference

DEFAULT_MAX_LENGTH = 2048  # HFLM's, for a config that names no context length
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's, for a task that names no max_gen_toks


@register_model("bumblecore")
class BumblecoreLM(TemplateLM):
    """lm-eval's model "bumblecore": `model_args` are `model_path` (a model directory or a LoRA adapter
    directory) and the loader's options; or, from Python, an already loaded `model` + `tokenizer`
    (a training run evaluates the model it is training)."""

    def __init__(
        self,
        model_path: Optional[str] = None,
        model=None,
        tokenizer=None,
        eos_token_ids: Optional[list[int]] = None,
        batch_size: int | str = 16,
        dtype: str = "auto",
        device: str = "auto",
        max_length: Optional[int] = None,
        base_model_path: Optional[str] = None,
        trust_remote_code: bool = False,
        **unused,
    ):
        super().__init__()
        if model is None:
            if model_path is None:
                raise ValueError("the bumblecore lm-eval model needs model_path (a model or LoRA adapter directory)")
            model, tokenizer, _ = load_for_inference(
                model_path, dtype, device, trust_remote_code=trust_remote_code, base_model_path=base_model_path
            )
            eos_token_ids = generation_stop_ids(model_path, base_model_path)
        self.model, self.tokenizer = model, tokenizer
        self.eos_token_ids = eos_token_ids
        # lm-eval passes "auto" or a number through simple_evaluate's batch_size; auto is our default here
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self._device = next(model.parameters()).device
        context = getattr(model.config, "max_position_embeddings", None)
        self.max_length = int(max_length or context or DEFAULT_MAX_LENGTH)

    # ---------------------------------------------------------------- tokens, as HFLM makes them

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and a rolling window's start) conditions on: BOS, else EOS."""
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return (self.tokenizer.name_or_path or "bumblecore").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """The tokenizer's own special tokens around the text (None), once: a text that already starts
        with the prefix token's string gets none added."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.decode(self.prefix_token_id))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    # ---------------------------------------------------------------- scoring

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether each of its tokens is the argmax) per
        (strings, context ids, continuation ids); long inputs keep their last max_length tokens."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        # Longest first, so each batch pads little (and an out-of-memory batch comes first).
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in batch]
            ids = torch.zeros(len(batch), max(len(x) for x in inputs), dtype=torch.long)
            for row, tokens in enumerate(inputs):
                ids[row, : len(tokens)] = torch.tensor(tokens)  # right padding: causal rows never see it
            logits = self.model(ids.to(self._device))
            for row, i in enumerate(batch):
                continuation = torch.tensor(requests[i][2], device=self._device)
                end = len(inputs[row])
                scores = logits[row, end - len(continuation) : end].float().log_softmax(dim=-1)
                greedy = bool((scores.argmax(dim=-1) == continuation).all())
                results[i] = (float(scores.gather(1, continuation[:, None]).sum()), greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over windows of max_length tokens, every token scored once (the
        first after the prefix token)."""
        totals = []
        for request in requests:
            windows = [
                (None, *make_disjoint_window(window))
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(request.args[0]),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(score for score, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            totals.append(total)
        return totals

    # ---------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued (greedy unless the task samples) until a stop string (`until`, and
        the EOS token's text, as HFLM adds it), the model's end-of-sequence ids (generation_stop_ids) or
        max_gen_toks; the text is decoded without special tokens and cut at the first stop string."""
        outputs: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        for members in groups.values():
            options = normalize_gen_kwargs(requests[members[0]].args[1], DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(options.pop("until", None), eos=eos_text)
            max_gen_toks = options.pop("max_gen_toks")
            params = sampling_params(options, until, max_gen_toks)
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room in a context of {self.max_length}")
            # The context keeps its last tokens when it is too long, leaving room for max_gen_toks.
            prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen_toks) :] for i in members]
            engine = GenerationEngine(
                self.model,
                self.tokenizer,
                max_batch_size=min(self.batch_size, len(prompts)),
                max_len=max(len(p) for p in prompts) + max_gen_toks,
                eos_token_ids=self.eos_token_ids,
            )
            for i, result in zip(members, engine.generate(prompts, params)):
                if result.get("error"):
                    raise RuntimeError(f"generation failed: {result['error']}")
                text = self.tokenizer.decode(result["token_ids"], skip_special_tokens=True)
                outputs[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs


def generation_stop_ids(model_path: str, base_model_path: Optional[str] = None) -> list[int]:
    """The ids transformers' `generate` stops on for this directory, as HFLM generates: generation_config.json's
    eos_token_id when the file exists, else config.json's (a LoRA adapter: its base's, which peft generates
    with). Unlike our chat commands, the chat template's end of turn is not added: lm-eval prompts are text
    (the EOS text is a stop string anyway)."""
    directory = Path(model_path)
    if (directory / "adapter_config.json").is_file():
        adapter = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        directory = Path(base_model_path or adapter.get("base_model_name_or_path") or directory)
    for name in ("generation_config.json", "config.json"):
        if (directory / name).is_file():
            eos = json.loads((directory / name).read_text(encoding="utf-8")).get("eos_token_id")
            return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return []


def sampling_params(options: dict, until: list[str], max_gen_toks: int) -> SamplingParams:
    """A task's generation_kwargs (after lm-eval normalised them) as our engine's SamplingParams; a key
    the engine has no meaning for is refused by name."""
    known = {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"generation_kwargs {', '.join(unknown)}: not supported by the bumblecore model "
            f"(it takes until, max_gen_toks, {', '.join(sorted(known))})"
        )
    do_sample = bool(options.get("do_sample", False))
    return SamplingParams(
        max_new_tokens=max_gen_toks,
        do_sample=do_sample,
        temperature=float(options.get("temperature", 1.0)) if do_sample else 1.0,
        top_k=int(options.get("top_k") or 0),
        top_p=float(options.get("top_p") or 1.0),
        repetition_penalty=float(options.get("repetition_penalty", 1.0)),
        stop=until,
        seed=options.get("seed"),
    )
