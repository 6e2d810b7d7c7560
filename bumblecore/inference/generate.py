"""Batched generation over a slot-based KV cache: prefill, then decode every active row together.

A request takes a free slot (a cache row), is prefilled, and decodes with the others until it stops
(end-of-sequence id, stop string, max_new_tokens or the context's end); its slot is then free for
the next request, between two decode steps (continuous batching). Each step chooses the tokens of
the whole batch at once, each row with its own sampling (the filters: inference/sampling.py), and
streams each request's text (inference/text_stream.py).

A request that makes a batched phase of a step raise (prefill, choosing tokens, decode) is found by
redoing that phase one request at a time, and fails alone: an "error" event, its slot freed; the
others continue exactly as they would have. A server must not be stuck repeating a failing step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch

from bumblecore.inference.constrained import Grammars
from bumblecore.inference.decode import decoding_model
from bumblecore.inference.loading import default_eos_ids  # here too: its older import path
from bumblecore.inference.logprobs import TokenLogprob, prompt_logprobs, token_logprobs
from bumblecore.inference.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache
from bumblecore.inference.sampling import SamplingParams, apply_repetition_penalty, greedy_tokens, warp_logits
from bumblecore.inference.text_stream import TextStream


@dataclass
class Event:
    request_id: int
    token_id: Optional[int]
    text: str
    finished: bool = False
    finish_reason: Optional[str] = None
    """stop, length, or error (then `error` says why and the request's slot is free)."""
    error: Optional[str] = None
    logprobs: Optional[TokenLogprob] = None
    """This token's, when the request asks (SamplingParams.logprobs)."""
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    """On a request's first event, when it asks (SamplingParams.prompt_logprobs)."""


# ---------------------------------------------------------------------------- the engine


@dataclass
class _Request:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    stream: TextStream
    generator: Optional[torch.Generator]
    generated: list[int] = field(default_factory=list)
    cached: int = 0
    """Prompt tokens whose keys and values came from the prefix cache (not prefilled)."""
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    matcher: Optional[object] = None
    """Its response_format's or forced tool call's grammar state (inference/constrained.py)."""


class GenerationEngine:
    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 8,
        max_len: Optional[int] = None,
        eos_token_ids: Optional[list[int]] = None,
        prefix_cache_mb: float = 0,
        prefix_block_size: int = DEFAULT_BLOCK_SIZE,
        static_cache: bool = False,
    ):
        """prefix_cache_mb: MiB of KV blocks that finished requests leave for later requests starting
        with the same tokens (inference/prefix_cache.py); 0 (the default) keeps none. Only for models
        with a slot cache (Bumblebee); a model that recomputes its sequences ignores it.
        static_cache: decode all slots in one fixed-shape compiled step (inference/static_decode.py)."""
        # A Bumblebee (or a peft model over one) decodes over a KV cache with slots; a model that brings
        # its own cache (model/transformers_family.py) recomputes the whole sequence every step.
        self.recomputes = hasattr(model, "new_cache")
        self.model = decoding_model(model, max_batch_size, static_cache).eval()
        self.tokenizer = tokenizer
        config = self.model.config
        context = getattr(config, "max_position_embeddings", 4096)  # custom code may not say
        self.max_len = min(max_len or context, context)
        parameter = next(self.model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.cache = self.model.new_cache(max_batch_size, self.max_len)
        self.vocab = config.vocab_size
        self.eos = set(eos_token_ids if eos_token_ids is not None else default_eos_ids(None, tokenizer))
        self.slots: list[Optional[_Request]] = [None] * max_batch_size
        self.pending: list[int] = []  # slots added since the last step: prefill them next
        self.seen = torch.zeros(max_batch_size, self.vocab, dtype=torch.bool, device=self.device)
        self.next_logits = torch.zeros(max_batch_size, self.vocab, dtype=torch.float32, device=self.device)
        # Slots whose next token the last decode already picked (greedy, DecodingBumblebee.greedy): their
        # next_logits are stale; the token is in next_tokens until the next step chooses it.
        self.next_tokens = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._screened: set[int] = set()
        self._ids = 0
        self.prefix_cache: Optional[PrefixCache] = None
        if prefix_cache_mb and prefix_cache_mb > 0 and not self.recomputes:
            self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20), prefix_block_size)
        self._weights = self._weight_versions()
        self.grammars = Grammars(tokenizer, self.vocab, sorted(self.eos))  # xgrammar loads on first use

    def _weight_versions(self) -> tuple:
        """In-place updates of the weights (an optimiser step) bump their version counters: stored
        keys and values are then stale."""
        return tuple(p._version for p in self.model.parameters())

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    @property
    def active(self) -> bool:
        return any(s is not None for s in self.slots)

    def add(self, prompt_ids: list[int], params: SamplingParams, live_text: bool = True) -> int:
        """Queue a request in a free slot; returns its id. It is prefilled at the next step. With
        live_text, each event carries the text decoded so far (for streaming); otherwise the text
        comes whole with the final event."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a context of {self.max_len}")
        slot = next((i for i, s in enumerate(self.slots) if s is None), None)
        if slot is None:
            raise RuntimeError("no free slot; wait for a request to finish")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        matcher = self.grammars.for_request(params)
        self._ids += 1
        self.slots[slot] = _Request(
            self._ids, list(prompt_ids), params, TextStream(self.tokenizer, params.stop, live_text), generator,
            matcher=matcher,
        )  # fmt: skip
        self.cache.reset(torch.tensor([slot], device=self.device))
        if self.prefix_cache is not None and params.prompt_logprobs is None:
            if self._weight_versions() != self._weights:
                self.prefix_cache.clear()
                self._weights = self._weight_versions()
            # At least the last prompt token is prefilled: its logits pick the first new token.
            self.slots[slot].cached = self.prefix_cache.load(self.cache, slot, prompt_ids, len(prompt_ids) - 1)
        if params.repetition_penalty != 1.0:
            self.seen[slot] = False
            self.seen[slot, torch.tensor(prompt_ids, device=self.device)] = True
        self.pending.append(slot)
        return self._ids

    def cancel(self, request_id: int) -> None:
        for slot, request in enumerate(self.slots):
            if request is not None and request.request_id == request_id:
                if slot in self.pending:
                    self.pending.remove(slot)
                else:  # prefilled: its row holds the prompt and what it generated so far
                    self._donate(slot, request)
                self.slots[slot] = None

    def _donate(self, slot: int, request: _Request) -> None:
        """Leave the row's keys and values (prompt + generated tokens, the last one not yet decoded:
        the row's length says how many) to the prefix cache for later requests."""
        if self.prefix_cache is not None:
            self.prefix_cache.store(self.cache, slot, request.prompt + request.generated)

    def _fail(self, slot: int, err: Exception) -> Event:
        request = self.slots[slot]
        self.slots[slot] = None
        if slot in self.pending:
            self.pending.remove(slot)
        return Event(request.request_id, None, "", True, "error", f"{type(err).__name__}: {err}")

    def _isolated(self, slots: list[int], run) -> list[Event]:
        """run(slots) for all at once; if it raises, for each alone (after undoing what the failed
        call wrote to the cache), failing only those that raise by themselves."""
        state = self._cache_state()
        try:
            run(slots)
            return []
        except Exception as err:
            if len(slots) == 1:
                self._restore_cache(state)
                return [self._fail(slots[0], err)]
        failed = []
        for slot in slots:
            self._restore_cache(state, [slot])
            try:
                run([slot])
            except Exception as err:
                failed.append(self._fail(slot, err))
        return failed

    def _cache_state(self):
        if self.recomputes:
            return [len(row) for row in self.cache.rows]
        return self.cache.lengths.clone()

    def _restore_cache(self, state, slots: Optional[list[int]] = None) -> None:
        for slot in range(len(self.slots)) if slots is None else slots:
            if self.recomputes:
                del self.cache.rows[slot][state[slot] :]
            else:
                self.cache.lengths[slot] = state[slot]

    def _prefill_groups(self, slots: list[int]) -> list[list[int]]:
        """Rows prefilled together. Rows that continue a cached prefix apart from those that start
        from nothing (a short suffix padded to a long cold prompt would cost as much as that prompt);
        a group whose padding would pass the end of the cache is prefilled row by row."""
        groups = [
            g for g in ([s for s in slots if not self.slots[s].cached], [s for s in slots if self.slots[s].cached]) if g
        ]
        out = []
        for group in groups:
            requests = [self.slots[s] for s in group]
            width = max(len(r.prompt) - r.cached for r in requests)
            if max(r.cached for r in requests) + width > self.max_len:
                out += [[s] for s in group]
            else:
                out.append(group)
        return out

    @torch.inference_mode()
    def _prefill(self, slots: list[int]) -> None:
        # Each row's tokens after its cached prefix; the model continues the row at its length.
        prompts = [self.slots[s].prompt[self.slots[s].cached :] for s in slots]
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(slots), width, dtype=torch.long)
        mask = torch.zeros(len(slots), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
            mask[row, : len(prompt)] = 1
        rows = self._rows(slots)
        ids, mask = ids.to(self.device), mask.to(self.device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        pick = torch.arange(len(slots), device=self.device), last
        if self.recomputes:
            states, head = self.model(ids, attention_mask=mask, kv_cache=self.cache, cache_rows=rows), None
            logits = states[pick]
        else:  # the LM head only where the next token is read (a 64-token prompt: 1/64 of its FLOPs)
            states = self.model(
                ids, attention_mask=mask, kv_cache=self.cache, cache_rows=rows, return_hidden_states=True
            )
            head = self.model.logits
            logits = head(states[pick])
        self.next_logits[rows] = logits.float()
        for row, slot in enumerate(slots):
            request = self.slots[slot]
            if request.params.prompt_logprobs is not None:  # whole prompt prefilled (add() skips the prefix cache)
                request.prompt_logprobs = prompt_logprobs(
                    head or (lambda logits: logits), states[row, : len(prompts[row]) - 1], request.prompt,
                    request.params.prompt_logprobs,
                )  # fmt: skip

    def _rows(self, slots: list[int]):
        """The cache rows of these slots (in order): a slice when they are a range, which the model
        reads as a view of its cache instead of gathering it; else a tensor (always when recomputing)."""
        if not self.recomputes and slots == list(range(slots[0], slots[-1] + 1)):
            return slice(slots[0], slots[-1] + 1)
        return torch.tensor(slots, device=self.device)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Prefill new requests, pick one token for every active row, decode them in one batch."""
        failed: list[Event] = []
        if self.pending:
            slots, self.pending = self.pending, []
            self._screened.difference_update(slots)  # prefill writes their next_logits
            for group in self._prefill_groups(slots):
                failed += self._isolated(group, self._prefill)
            failed += [self._score_only(s) for s in slots if self._scores_only(s)]
        active = [i for i, s in enumerate(self.slots) if s is not None]
        if not active:
            return failed
        picked: dict[int, int] = {}

        def choose(slots: list[int]) -> None:
            tokens, bad = self._choose(self._rows(slots), [self.slots[i] for i in slots], slots)
            if bad and len(slots) > 1:
                raise ValueError("non-finite sampling probabilities")  # redone alone: only the bad rows fail
            if bad:
                raise ValueError(
                    "sampling probabilities are not finite (temperature, top_p or repetition_penalty "
                    "out of range for this model's logits)"
                )
            picked.update(zip(slots, tokens.tolist()))
            self._screened.difference_update(slots)  # their tokens are taken

        failed += self._isolated(active, choose)
        active = [i for i in active if i in picked]
        logprobs = self._logprobs(active, picked)
        events, continuing = [], []
        for slot in active:
            token = picked[slot]
            request = self.slots[slot]
            request.generated.append(token)
            if request.matcher is not None:
                request.matcher.accept_token(token)
            if request.params.repetition_penalty != 1.0:  # only penalised rows need the seen-token mask
                self.seen[slot, token] = True
            reason = None
            ended = request.matcher is not None and request.matcher.is_terminated()  # its JSON is complete
            if ended or (token in self.eos and not request.params.ignore_eos):
                text, reason = request.stream.finish(), "stop"
            else:
                text, hit_stop = request.stream.push(token)
                if hit_stop:
                    reason = "stop"
                elif (
                    request.params.max_new_tokens is not None
                    and len(request.generated) >= request.params.max_new_tokens
                ) or len(request.prompt) + len(
                    request.generated
                ) >= self.max_len:  # max_new_tokens None: the context's end
                    text, reason = text + request.stream.finish(), "length"
            event = Event(request.request_id, token, text, reason is not None, reason, logprobs=logprobs.get(slot))
            event.prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None  # on the first event
            events.append(event)
            if reason is None:
                continuing.append(slot)
            else:
                self._donate(slot, request)
                self.slots[slot] = None
        if continuing:
            events += self._isolated(continuing, self._decode)
        return failed + events

    def _scores_only(self, slot: int) -> bool:
        request = self.slots[slot]
        return request is not None and request.params.max_new_tokens == 0

    def _score_only(self, slot: int) -> Event:
        """A request for no new tokens (prompt scoring) ends after its prefill, with its prompt logprobs."""
        request, self.slots[slot] = self.slots[slot], None
        return Event(request.request_id, None, "", True, "length", prompt_logprobs=request.prompt_logprobs)

    def _logprobs(self, slots: list[int], picked: dict[int, int]) -> dict[int, TokenLogprob]:
        """The chosen tokens' log-probabilities, for the slots whose requests ask (their next_logits
        are the raw logits: _decode never screens them)."""
        asking = [s for s in slots if self.slots[s].params.logprobs is not None]
        if not asking:
            return {}
        index = torch.tensor(asking, device=self.device)
        tokens = torch.tensor([picked[s] for s in asking], device=self.device)
        top = [self.slots[s].params.logprobs for s in asking]
        return dict(zip(asking, token_logprobs(self.next_logits[index], tokens, top)))

    @torch.inference_mode()
    def _decode(self, slots: list[int]) -> None:
        rows = self._rows(slots)
        tokens = torch.tensor([self.slots[s].generated[-1] for s in slots], device=self.device)[:, None]
        if self.recomputes:
            logits = self.model(tokens, kv_cache=self.cache, cache_rows=rows)[:, -1]
        else:
            hidden = self.model(tokens, kv_cache=self.cache, cache_rows=rows, return_hidden_states=True)[:, -1]
            params = [self.slots[s].params for s in slots]
            if not any(
                p.do_sample
                or p.repetition_penalty != 1.0
                or p.logprobs is not None
                or p.response_format
                or p.tool_calls
                for p in params
            ):
                # Greedy rows only need the argmax: found without the full fp32 logits where the model can.
                greedy = self.model.greedy(hidden)
                if greedy is not None:
                    self.next_tokens[rows] = greedy
                    self._screened.update(slots)
                    return
            if isinstance(rows, slice):  # logits written straight into next_logits (a view): no copy
                self.model.logits(hidden, out=self.next_logits[rows])
                return
            logits = self.model.logits(hidden)
        self.next_logits[rows] = logits.float()

    def _choose(self, rows, requests: list[_Request], slots: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Each row's next token, and the rows whose sampling distribution is not a distribution
        (NaN or infinite scores after the filters: nothing is drawn for any row then)."""
        logits = self.next_logits[rows]  # a view when rows is a slice: nothing below writes into it
        params = [r.params for r in requests]
        # Screened slots are greedy without penalty (only such batches are screened): token known.
        screened = [i for i, slot in enumerate(slots) if slot in self._screened]
        if len(screened) == len(slots):
            return self.next_tokens[rows].clone(), []
        if any(p.repetition_penalty != 1.0 for p in params):
            penalty = torch.tensor([p.repetition_penalty for p in params], device=self.device)
            logits = apply_repetition_penalty(logits, self.seen[rows], penalty[:, None])
        if any(r.matcher is not None for r in requests):  # tokens their grammars do not allow: -inf
            logits = self.grammars.mask(logits, [r.matcher for r in requests])
        greedy = greedy_tokens(logits)
        if screened:
            index = torch.tensor(screened, device=self.device)
            greedy[index] = self.next_tokens[rows][index]
        sampled_rows = [i for i, p in enumerate(params) if p.do_sample]
        if not sampled_rows:
            return greedy, []
        index = torch.tensor(sampled_rows, device=self.device)
        subset = [params[i] for i in sampled_rows]
        filtered = warp_logits(
            logits[index],
            torch.tensor([max(p.temperature, 1e-5) for p in subset], device=self.device),
            torch.tensor([p.top_k for p in subset], device=self.device),
            torch.tensor([p.top_p for p in subset], device=self.device),
        )
        probs = filtered.softmax(dim=-1)
        # What torch.multinomial would refuse, found before any row draws (a draw advances a seeded
        # generator: a batch redone after a refused draw would not give the same tokens).
        bad = (~torch.isfinite(probs).all(dim=-1)) | ~(probs.sum(dim=-1) > 0)
        if bad.any():
            return greedy, [sampled_rows[j] for j in bad.nonzero()[:, 0].tolist()]
        for j, i in enumerate(sampled_rows):
            greedy[i] = torch.multinomial(probs[j], 1, generator=requests[i].generator)[0]
        return greedy, []

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[dict]:
        """Every prompt to completion (continuous batching over the slots); results in prompt order.
        `params` is one for all, or one per prompt (say, each its own seed)."""
        results: dict[int, dict] = {}
        order: list[int] = []
        queue = list(zip(prompts, params if isinstance(params, list) else [params] * len(prompts), strict=True))
        while queue or self.active:
            while queue and self.free_slots:
                order.append(self.add(*queue.pop(0), live_text=False))
            for event in self.step():
                result = results.setdefault(event.request_id, {"text": "", "token_ids": [], "finish_reason": None})
                result["text"] += event.text
                if event.token_id is not None:
                    result["token_ids"].append(event.token_id)
                if event.finished:
                    result["finish_reason"] = event.finish_reason
                if event.error:
                    result["error"] = event.error
        return [results[i] for i in order]

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """Text deltas of one request as they are generated."""
        request_id = self.add(prompt, params)
        while True:
            for event in self.step():
                if event.request_id == request_id:
                    if event.error:
                        raise RuntimeError(f"generation failed: {event.error}")
                    if event.text:
                        yield event.text
                    if event.finished:
                        return
