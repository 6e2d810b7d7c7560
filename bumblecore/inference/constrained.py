"""Structured output: a request's `response_format` (a JSON object, or JSON that follows a JSON Schema)
or forced tool call (inference/tool_choice.py) enforced while decoding, with xgrammar (a maintained
grammar engine that runs on CPU too). Each constrained request has its own grammar matcher; before its next token is chosen, the tokens the
grammar does not allow get -inf, and the chosen token advances the matcher. Requests without a
format are batched with them untouched.

The JSON is compact (`,` and `:` with no whitespace around them, none between tokens), so even a
weak model cannot spend its tokens on spaces and newlines; a model finishes a small schema in few
tokens. xgrammar is imported only when a request asks for a format.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Optional

import torch

ANY_OBJECT = '{"type": "object"}'  # json_object: any JSON object (not strict: any properties)
COMPACT = (",", ":")
CACHED_GRAMMARS = 64


def xgrammar():
    try:
        import xgrammar
    except ImportError as err:
        raise ImportError(
            "response_format needs the xgrammar package: pip install xgrammar (or bumblecore[structured])"
        ) from err
    return xgrammar


def check_schema(schema: str, strict: bool, separators: tuple[str, str] = COMPACT):
    """The schema's xgrammar Grammar; ValueError when xgrammar cannot make one (before any model work)."""
    try:
        return xgrammar().Grammar.from_json_schema(
            schema, any_whitespace=False, separators=separators, strict_mode=strict
        )
    except ImportError:
        raise
    except Exception as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(re.sub(r"^\[[^\]]*\] \S+: ", "", first_line)) from None  # less "[time] file.cc:line: "


class Grammars:
    """The compiled grammars of one engine's tokenizer and vocabulary, the latest ones cached."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids
        self.info = self.compiler = None  # made for the first request with a format
        self.compiled: OrderedDict = OrderedDict()

    def for_request(self, params) -> Optional[object]:
        """A fresh matcher for a request's SamplingParams: its forced tool call's structural tag
        (inference/tool_choice.py) or its response_format; None when it has neither."""
        if params.tool_calls:
            return self._matcher(
                ("structural_tag", params.tool_calls), lambda c: c.compile_structural_tag(params.tool_calls)
            )
        if params.response_format:
            return self.matcher(*params.response_format)
        return None

    def matcher(self, schema: str, strict: bool):
        return self._matcher(
            (schema, strict),
            lambda c: c.compile_json_schema(schema, any_whitespace=False, separators=COMPACT, strict_mode=strict),
        )

    def _matcher(self, key, compile_grammar):
        if self.compiler is None:
            xgr = xgrammar()
            self.info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
            )
            self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        grammar = self.compiled.pop(key, None)
        if grammar is None:
            grammar = compile_grammar(self.compiler)
        self.compiled[key] = grammar
        while len(self.compiled) > CACHED_GRAMMARS:
            self.compiled.popitem(last=False)
        return xgrammar().GrammarMatcher(grammar)

    def mask(self, logits: torch.Tensor, matchers: list[Optional[object]]) -> torch.Tensor:
        """The logits (rows, vocab) with each constrained row's disallowed tokens at -inf (a copy:
        the raw logits stay for logprobs); rows whose matcher is None are left as they are."""
        xgr = xgrammar()
        rows = [i for i, m in enumerate(matchers) if m is not None]
        bitmask = xgr.allocate_token_bitmask(len(matchers), self.info.vocab_size)
        for i in rows:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        masked = logits.clone()
        xgr.apply_token_bitmask_inplace(
            masked, bitmask.to(masked.device), vocab_size=self.info.vocab_size, indices=rows
        )
        return masked


def format_schema(response_format: Optional[dict]) -> Optional[tuple[str, bool]]:
    """OpenAI's response_format (checked already) as (JSON Schema text, strict), or None for plain text.
    A json_schema is strict in xgrammar's sense (no properties the schema does not name, unless it
    allows them), so the reply stays bounded; json_object allows any object."""
    if not response_format or response_format.get("type") == "text":
        return None
    if response_format["type"] == "json_object":
        return ANY_OBJECT, False
    return json.dumps(response_format["json_schema"]["schema"]), True
