"""The engine's log-probabilities (inference/logprobs.py) against transformers' log_softmax of the same
checkpoint's logits: generated tokens and prompt tokens, batched with requests that do not ask (whose
tokens stay what they are alone), prompt scoring with no new tokens, and the prefix cache left out."""

import torch
from transformers import AutoModelForCausalLM

from bumblecore.inference.generate import GenerationEngine, SamplingParams
from bumblecore.inference.loading import load_for_inference

PROMPTS = ["The bee reads the data.", "蜜蜂喜欢花园里的花。", "A small model trains on 42 tokens?"]


def reference_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax over the logits of every position of ids (seq, vocab)."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_logprobs_equal_transformers_and_cost_nothing_to_others(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint(tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, tok, eos = load_for_inference(str(path), device_map="cpu")
    engine = GenerationEngine(model, tok, max_batch_size=4, max_len=128, eos_token_ids=[], prefix_cache_mb=16)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    plain = SamplingParams(max_new_tokens=6)
    alone = engine.generate(prompts, plain)  # no request asks: the greedy fast path
    asking = SamplingParams(max_new_tokens=6, logprobs=3, prompt_logprobs=2)
    sampled = SamplingParams(max_new_tokens=6, do_sample=True, temperature=0.7, seed=5, logprobs=1)
    requests = [engine.add(prompts[0], asking), engine.add(prompts[1], plain), engine.add(prompts[2], sampled)]
    scoring = engine.add(prompts[1], SamplingParams(max_new_tokens=0, prompt_logprobs=1))
    events = {r: [] for r in requests + [scoring]}
    while engine.active:
        for event in engine.step():
            events[event.request_id].append(event)

    worst = 0.0
    # The plain request batched with the asking ones gives the tokens it gives alone, and no logprobs.
    assert [e.token_id for e in events[requests[1]]] == alone[1]["token_ids"]
    assert all(e.logprobs is None and e.prompt_logprobs is None for e in events[requests[1]])
    assert [e.token_id for e in events[requests[0]]] == alone[0]["token_ids"]
    for request, prompt, top in [(requests[0], prompts[0], 3), (requests[2], prompts[2], 1)]:
        generated = [e.token_id for e in events[request]]
        expected = reference_logprobs(hf, prompt + generated)[len(prompt) - 1 : -1]
        for position, event in enumerate(events[request]):
            token, logprob, best = event.logprobs
            assert token == event.token_id
            worst = max(worst, abs(logprob - expected[position, token].item()))
            values, ids = expected[position].topk(top)
            assert [i for i, _ in best] == ids.tolist()
            worst = max(worst, max(abs(v - w) for (_, v), w in zip(best, values.tolist())))
    # Prompt logprobs: token i given the tokens before it, on the first event only.
    for request, prompt, top in [(requests[0], prompts[0], 2), (scoring, prompts[1], 1)]:
        first, *rest = events[request]
        assert all(e.prompt_logprobs is None for e in rest)
        expected = reference_logprobs(hf, prompt)
        assert [t for t, _, _ in first.prompt_logprobs] == prompt[1:]
        for i, (token, logprob, best) in enumerate(first.prompt_logprobs):
            worst = max(worst, abs(logprob - expected[i, token].item()))
            assert [t for t, _ in best] == expected[i].topk(top).indices.tolist()
    # Scoring only: one event, no token, the prompt's logprobs.
    assert len(events[scoring]) == 1 and events[scoring][0].token_id is None
    assert events[scoring][0].finish_reason == "length"
    assert worst < 1e-4, worst
    print(f"largest |ours - transformers log_softmax|: {worst:.2e}")
