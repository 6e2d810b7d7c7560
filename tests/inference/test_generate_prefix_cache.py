"""Prefix reuse (inference/prefix_cache.py): a request continuing a stored prefix generates what a
cold engine does (greedy and seeded), for partial and full matches, across slots, ragged batches,
after eviction and after a weight update; the store's LRU keeps its byte budget and evicts leaves first."""

import torch
from tiny import make_tiny_model

from bumblecore.inference.generate import GenerationEngine, SamplingParams
from bumblecore.inference.prefix_cache import PrefixCache

VOCAB = 768
BLOCK = 16
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


class IdsTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def tokens(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(model, slots=2, mb=1.0, max_len=256):
    return GenerationEngine(model, IdsTokenizer(), slots, max_len, eos_token_ids=[], prefix_cache_mb=mb)


def cold(model, prompt, params=GREEDY):
    return engine(model, 1, 0).generate([prompt], params)[0]["token_ids"]


def test_turns_of_a_conversation_reuse_the_history_and_generate_what_a_cold_run_does():
    model = make_tiny_model(VOCAB)
    warm = engine(model)
    history = tokens(45, 1)
    for turn in range(3):
        before = warm.prefix_cache.stats["hit_tokens"]
        reply = warm.generate([history], GREEDY)[0]["token_ids"]
        assert reply == cold(model, history)
        reused = warm.prefix_cache.stats["hit_tokens"] - before
        if turn:  # the previous prompt and reply (but its last token, never decoded) are stored
            assert reused == ((len(history) - 13 - 1) // BLOCK) * BLOCK > 0
        history = history + reply + tokens(7, 10 + turn)  # the next user message


def test_first_logits_after_a_reused_prefix_equal_the_reference_forward():
    model = make_tiny_model(VOCAB)
    warm = engine(model, slots=1)
    first = tokens(40, 2)
    reply = warm.generate([first], GREEDY)[0]["token_ids"]
    prompt = first + reply + tokens(5, 3)
    warm.add(prompt, GREEDY)
    assert warm.slots[0].cached == 48
    warm._prefill(warm.pending)  # the prefill alone: step() would decode on and overwrite the logits
    with torch.inference_mode():
        expected = model(torch.tensor([prompt]))[0, -1]
    torch.testing.assert_close(warm.next_logits[0], expected.float(), atol=1e-4, rtol=1e-4)


def test_seeded_sampling_and_repetition_penalty_match_a_cold_run():
    model = make_tiny_model(VOCAB)
    warm = engine(model)
    first = tokens(50, 4)
    seeded = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=50, top_p=0.9, seed=5)
    penalised = SamplingParams(max_new_tokens=10, ignore_eos=True, repetition_penalty=1.3)
    reply = warm.generate([first], seeded)[0]["token_ids"]
    prompt = first + reply + tokens(6, 5)
    for params in (seeded, penalised):
        got = warm.generate([prompt], params)[0]["token_ids"]
        assert got == cold(model, prompt, params)
    assert warm.prefix_cache.stats["hit_tokens"] >= 2 * 48


def test_full_and_partial_matches_keep_the_last_prompt_token_to_prefill():
    model = make_tiny_model(VOCAB)
    warm = engine(model, slots=1)
    prompt = tokens(32, 6)  # two whole blocks
    warm.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))  # stores exactly the prompt
    assert len(warm.prefix_cache) == 2
    warm.add(prompt, GREEDY)  # full match: the second block is recomputed for the last position's logits
    assert warm.slots[0].cached == 16
    assert [e.token_id for e in _run(warm)] == cold(model, prompt)
    diverging = prompt[:20] + tokens(30, 7)  # shares one block and 4 tokens
    warm.add(diverging, GREEDY)
    assert warm.slots[0].cached == 16
    assert [e.token_id for e in _run(warm)] == cold(model, diverging)
    other = tokens(40, 8)  # a different first block: nothing reused
    warm.add(other, GREEDY)
    assert warm.slots[0].cached == 0
    assert [e.token_id for e in _run(warm)] == cold(model, other)


def _run(eng):
    events = []
    while eng.active:
        events += eng.step()
    return events


def test_a_prefix_stored_from_one_slot_serves_another_and_ragged_rows_prefill_together():
    model = make_tiny_model(VOCAB)
    warm = engine(model, slots=3)
    a, b = tokens(37, 9), tokens(70, 10)
    replies = warm.generate([a, b], GREEDY)
    busy = warm.add(tokens(20, 11), SamplingParams(max_new_tokens=30, ignore_eos=True))  # holds slot 0
    warm.step()
    # Both second turns, added together: slots 1 and 2, different cached lengths, one prefill.
    second = [a + replies[0]["token_ids"] + tokens(3, 12), b + replies[1]["token_ids"] + tokens(20, 13)]
    ids = [warm.add(p, GREEDY) for p in second]
    assert [warm.slots[s].cached for s in (1, 2)] == [48, 80]
    got: dict[int, list] = {}
    for event in _run(warm):
        got.setdefault(event.request_id, []).append(event.token_id)
    assert [got[i] for i in ids] == [cold(model, p) for p in second]
    assert len(got[busy]) == 29


def test_cold_and_warm_rows_of_one_step_and_a_prefill_near_the_end_of_the_cache():
    model = make_tiny_model(VOCAB)
    warm = engine(model, slots=2, max_len=128)
    first = tokens(90, 14)
    reply = warm.generate([first], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]["token_ids"]
    long_warm = first + reply + tokens(4, 15)  # 80 cached + 18 to prefill
    long_cold = tokens(100, 16)  # padded together, 80 + 100 would pass the cache's 128 positions
    results = warm.generate([long_warm, long_cold], SamplingParams(max_new_tokens=8, ignore_eos=True))
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    assert [r["token_ids"] for r in results] == [cold(model, long_warm, params), cold(model, long_cold, params)]


def test_a_cancelled_request_donates_what_it_computed():
    model = make_tiny_model(VOCAB)
    warm = engine(model, slots=1)
    prompt = tokens(40, 17)
    request = warm.add(prompt, SamplingParams(max_new_tokens=50, ignore_eos=True))
    for _ in range(10):
        warm.step()
    warm.cancel(request)
    assert len(warm.prefix_cache) == (40 + 9) // BLOCK
    pending = warm.add(prompt + tokens(3, 18), GREEDY)
    warm.cancel(pending)  # cancelled before its prefill: nothing new stored
    assert len(warm.prefix_cache) == 3


def test_eviction_keeps_the_budget_and_correctness():
    model = make_tiny_model(VOCAB)
    block_bytes = 2 * 2 * BLOCK * 2 * 16 * 4  # layers, k/v, tokens, kv heads, head dim, float32
    warm = engine(model, slots=1, mb=5 * block_bytes / 2**20)
    conversations = [tokens(50, 20 + i) for i in range(3)]
    for prompt in conversations:
        warm.generate([prompt], GREEDY)
        assert warm.prefix_cache.bytes <= warm.prefix_cache.budget_bytes
        assert len(warm.prefix_cache) <= 5
    assert warm.prefix_cache.stats["evicted_blocks"] > 0
    # The newest conversation's blocks are the ones kept; the oldest's are gone.
    warm.add(conversations[0] + tokens(4, 30), GREEDY)
    assert warm.slots[0].cached == 0
    assert [e.token_id for e in _run(warm)] == cold(model, conversations[0] + tokens(4, 30))
    newest = conversations[2] + tokens(4, 31)
    warm.add(newest, GREEDY)
    assert warm.slots[0].cached > 0
    assert [e.token_id for e in _run(warm)] == cold(model, newest)


def test_lru_evicts_leaves_first_and_touches_whole_chains():
    store = PrefixCache(budget_bytes=4 * 64, block_size=2)  # room for 4 blocks of 64 bytes

    class Row:  # one cache row of 1 layer, 2 kv heads x 2 dims, float32: 16 bytes a token... x2 (k, v)
        def __init__(self, n):
            self.keys = [torch.arange(n * 4.0).view(1, n, 2, 2)]
            self.values = [-torch.arange(n * 4.0).view(1, n, 2, 2)]
            self.lengths = torch.tensor([n])

    shared = [1, 2, 3, 4]
    store.store(Row(6), 0, shared + [5, 6])  # blocks (1,2) (3,4) (5,6)
    store.store(Row(6), 0, shared + [7, 8])  # (7,8) under the shared two: 4 blocks, full
    assert len(store) == 4
    store.store(Row(6), 0, [9, 9, 9, 9, 9, 9])  # 3 new: 3 go, leaves first: (5,6), (7,8), then (3,4)
    assert store.bytes <= store.budget_bytes and store.stats["evicted_blocks"] == 3
    assert len(store.match(shared + [7, 8], 6)) == 1  # (1,2) stays: never a parent before its children
    store.store(Row(6), 0, shared + [5, 6])
    found = store.match(shared + [5, 6], 6)
    assert len(found) == 3 and torch.equal(found[2][0, 0], torch.arange(16.0, 24.0).view(2, 2, 2))
    assert len(store.match(shared + [5, 6], 5)) == 2  # a limit inside a block stops before it


def test_an_updated_model_does_not_reuse_stale_keys_and_values():
    model = make_tiny_model(VOCAB)
    warm = engine(model, slots=1)
    prompt = tokens(40, 40)
    warm.generate([prompt], GREEDY)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    warm.add(prompt, GREEDY)
    assert warm.slots[0].cached == 0
    assert [e.token_id for e in _run(warm)] == cold(model, prompt)


def test_disabled_by_default_and_for_models_that_recompute():
    model = make_tiny_model(VOCAB)
    assert GenerationEngine(model, IdsTokenizer(), 1, 64, eos_token_ids=[]).prefix_cache is None
    assert engine(model, mb=0).prefix_cache is None


def test_serve_and_chat_take_the_budget():
    import inspect

    from bumblecore.inference import commands, serve
    from bumblecore.inference.serve_settings import DEFAULT_PREFIX_CACHE_MB, ServeSettings

    assert ServeSettings("m").prefix_cache_mb == DEFAULT_PREFIX_CACHE_MB == 256
    assert inspect.signature(serve.serve).parameters["prefix_cache_mb"].default == 256
    assert inspect.signature(commands.chat).parameters["prefix_cache_mb"].default == 256


def test_a_multi_turn_chat_through_the_server_answers_as_a_cold_engine(tmp_path, tiny_checkpoint):
    """serve keeps a prefix cache by default: each turn, history included, gets a cold run's reply."""
    import openai
    from serving import running_server

    from bumblecore.inference.commands import build_prompt_ids
    from bumblecore.inference.loading import load_for_inference

    model_dir = str(tiny_checkpoint(tmp_path / "model", max_position_embeddings=512))
    model, tokenizer, eos = load_for_inference(model_dir, device_map="cpu")
    oracle = GenerationEngine(model, tokenizer, 1, 512, eos_token_ids=eos)
    mirror = GenerationEngine(model, tokenizer, 1, 512, eos_token_ids=eos, prefix_cache_mb=1)  # as the worker's
    messages = [{"role": "system", "content": "You are a bee. " * 8}]
    with running_server(model_dir, max_batch_size=2, max_model_len=512) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="dummy", max_retries=0, timeout=60)
        for question in ("hello bee", "and the hive?", "what about honey"):
            messages.append({"role": "user", "content": question})
            reply = client.chat.completions.create(model="bumblebee", messages=messages, max_tokens=10, temperature=0)
            ids = build_prompt_ids(tokenizer, messages, "sft")
            expected = oracle.generate([ids], SamplingParams(max_new_tokens=10))[0]["text"]
            assert reply.choices[0].message.content == expected and reply.usage.prompt_tokens == len(ids)
            messages.append({"role": "assistant", "content": expected})
            mirror.generate([ids], SamplingParams(max_new_tokens=10))
    # The re-rendered history matched the stored prompts and replies: turns 2 and 3 reused most of it.
    assert mirror.prefix_cache.stats["hit_tokens"] >= len(ids) // 2
