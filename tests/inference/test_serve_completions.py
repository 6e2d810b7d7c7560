"""`/v1/completions`, chat logprobs, `n > 1`, `/tokenize` and `/detokenize` on a live `bumblecore serve`,
through the real `openai` client and lm-eval's `local-completions` model: logprobs equal transformers'
log_softmax of the same checkpoint, and lm-eval's loglikelihoods through the server equal its HF backend's."""

import pytest
import requests
import torch
from serving import running_server, xgrammar_or_skip
from transformers import AutoModelForCausalLM

from bumblecore.chat.format import encode_raw_prompt, render_prompt
from bumblecore.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # one server for the module

openai = pytest.importorskip("openai")

CONTEXT = 256
MODEL = "bumblebee"
TOLERANCE = 1e-4
MESSAGES = [{"role": "user", "content": "hello bee"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_checkpoint):
    return tiny_checkpoint(tmp_path_factory.mktemp("completions_model"))


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(str(model_dir), max_batch_size=8, max_model_len=CONTEXT, model_name=MODEL) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="dummy", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(str(model_dir))


def log_softmax(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax of the logits at every position of ids (seq, vocab): row i scores token i + 1."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def greedy(hf, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(log_softmax(hf, ids)[-1].argmax()))
    return ids


def test_completion_echo_logprobs_equal_transformers(client, hf, tok):
    prompt = "The bee reads 42 tokens."
    ids = encode_raw_prompt(tok, prompt)
    reply = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True, extra_body={"ignore_eos": True}
    )
    choice = reply.choices[0]
    whole = greedy(hf, ids, 5)
    assert choice.text == prompt + tok.decode(whole[len(ids) :])
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 5
    logprobs = choice.logprobs
    assert logprobs.tokens == [tok.decode([t]) for t in whole]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = log_softmax(hf, whole)
    worst = max(abs(logprobs.token_logprobs[i] - expected[i - 1, whole[i]].item()) for i in range(1, len(whole)))
    for i in range(1, len(whole)):
        values, top_ids = expected[i - 1].topk(2)
        named = {}  # {text: logprob}: of two tokens with one text (a partial UTF-8 byte), the likelier
        for t, v in zip(top_ids.tolist(), values.tolist()):
            named.setdefault(tok.decode([t]), v)
        assert list(logprobs.top_logprobs[i]) == list(named)
        worst = max(worst, *(abs(a - b) for a, b in zip(logprobs.top_logprobs[i].values(), named.values())))
    assert worst < TOLERANCE, worst
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets


def test_prompt_forms_n_seed_and_choice_index(client, tok):
    token_prompt = encode_raw_prompt(tok, "蜜蜂喜欢花")
    body = dict(model=MODEL, max_tokens=6, temperature=1.0, n=2, seed=11, extra_body={"ignore_eos": True})
    reply = client.completions.create(prompt=["hello bee", token_prompt], **body)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]  # prompt_index * n + sample_index
    again = client.completions.create(prompt=["hello bee", token_prompt], **body)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]  # seeded: reproducible
    assert reply.choices[0].text != reply.choices[1].text  # independent samples of one prompt
    # A prompt's samples do not depend on the other prompts of the request (each sample's own seed).
    alone = client.completions.create(prompt=[token_prompt], **body)
    assert [c.text for c in alone.choices] == [c.text for c in reply.choices[2:]]
    # Token ids and their text are the same prompt.
    greedy_body = dict(model=MODEL, max_tokens=6, temperature=0)
    by_text = client.completions.create(prompt="蜜蜂喜欢花", **greedy_body).choices[0].text
    by_ids = client.completions.create(prompt=[token_prompt], **greedy_body).choices[0].text
    assert by_text == by_ids


def test_scoring_only_and_stream(client, hf, tok):
    prompt = "A small model learns."
    ids = encode_raw_prompt(tok, prompt)
    scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == tok.decode(ids) and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and len(choice.logprobs.token_logprobs) == len(ids)
    expected = log_softmax(hf, ids)
    worst = max(abs(choice.logprobs.token_logprobs[i] - expected[i - 1, ids[i]].item()) for i in range(1, len(ids)))
    assert worst < TOLERANCE
    # A stream of two greedy choices with logprobs: each choice's chunks add up to the whole reply.
    body = dict(model=MODEL, prompt=prompt, max_tokens=7, temperature=0, logprobs=1, n=2, echo=True)
    whole = client.completions.create(**body)
    texts, tokens, logprobs = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}
    for chunk in client.completions.create(**body, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.text
            tokens[c.index] += c.logprobs.tokens
            logprobs[c.index] += c.logprobs.token_logprobs
        if chunk.usage:
            assert chunk.usage.completion_tokens == whole.usage.completion_tokens
    for index in (0, 1):
        assert texts[index] == whole.choices[index].text
        assert tokens[index] == whole.choices[index].logprobs.tokens
        assert logprobs[index] == pytest.approx(whole.choices[index].logprobs.token_logprobs, abs=1e-6)


def test_chat_logprobs_n_and_stream(client, hf, tok):
    ids = render_prompt(tok, MESSAGES)
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    whole = greedy(hf, ids, 6)
    expected = log_softmax(hf, whole)
    content = reply.choices[0].logprobs.content
    assert [e.token for e in content] == [tok.decode([t]) for t in whole[len(ids) :]]
    worst = 0.0
    for i, entry in enumerate(content):
        position = len(ids) - 1 + i
        assert entry.bytes == list(entry.token.encode())
        worst = max(worst, abs(entry.logprob - expected[position, whole[len(ids) + i]].item()))
        values, top_ids = expected[position].topk(3)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([t]) for t in top_ids.tolist()]
        worst = max(worst, *(abs(t.logprob - v) for t, v in zip(entry.top_logprobs, values.tolist())))
    assert worst < TOLERANCE, worst
    streamed = []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True,
        extra_body={"ignore_eos": True},
    ):  # fmt: skip
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    # n samples: independent, seeded (the same request gives the same choices), in a stream too.
    body = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, n=3, seed=7)
    first = client.chat.completions.create(**body)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) > 1
    assert [c.message.content for c in client.chat.completions.create(**body).choices] == texts
    parts = {0: "", 1: "", 2: ""}
    for chunk in client.chat.completions.create(**body, stream=True):
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
    assert [parts[i] for i in range(3)] == texts
    assert first.choices[0].logprobs is None  # not asked: none


def test_tokenize_and_detokenize(server, tok):
    text = "蜜蜂 reads <|im_end|> here"
    reply = requests.post(server + "/tokenize", json={"prompt": text}).json()
    assert reply == {"count": len(reply["tokens"]), "max_model_len": CONTEXT, "tokens": encode_raw_prompt(tok, text)}
    chat = requests.post(server + "/tokenize", json={"messages": MESSAGES, "return_token_strs": True}).json()
    assert chat["tokens"] == render_prompt(tok, MESSAGES)
    assert chat["token_strs"] == tok.convert_ids_to_tokens(chat["tokens"])
    bare = requests.post(server + "/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert chat["tokens"][: bare["count"]] == bare["tokens"] and bare["count"] < chat["count"]
    back = requests.post(server + "/detokenize", json={"tokens": reply["tokens"]}).json()
    assert back == {"prompt": text}


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": [[1, 2], "x", []]}, "prompt"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo"),
        ("/v1/completions", {}, "prompt"),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 129}, "n"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, "add_special_tokens"),
        ("/detokenize", {"tokens": ["a"]}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format.type"),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 1}}}},
            "response_format.json_schema.schema",
        ),
        ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ],
)
def test_bad_values_are_400_naming_the_field(server, route, body, param):
    reply = requests.post(server + route, json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["color", "ok", "size"],
}


def test_response_format_json_schema_validates(client):
    """Sampled replies of a random model, n of them, through chat and text completions: each one is compact
    JSON that validates against its schema (jsonschema), batched with an unconstrained request."""
    jsonschema = xgrammar_or_skip()
    import concurrent.futures
    import json

    response_format = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        chat = pool.submit(
            client.chat.completions.create, model=MODEL, messages=MESSAGES, max_tokens=64, temperature=1.0, n=3,
            seed=4, response_format=response_format,
        )  # fmt: skip
        text = pool.submit(
            client.completions.create, model=MODEL, prompt="A bee:", max_tokens=64, temperature=1.0, n=2, seed=5,
            extra_body={"response_format": response_format},
        )  # fmt: skip
        plain = pool.submit(client.completions.create, model=MODEL, prompt="A bee:", max_tokens=8, temperature=0)
        replies = [c.message.content for c in chat.result().choices] + [c.text for c in text.result().choices]
        assert (
            plain.result().choices[0].text
            == client.completions.create(model=MODEL, prompt="A bee:", max_tokens=8, temperature=0).choices[0].text
        )
    for reply in replies:
        value = json.loads(reply)
        jsonschema.validate(value, SCHEMA)
        assert reply == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    print("json_schema replies:", replies)


def test_lm_eval_local_completions_equals_its_hf_backend(server, model_dir):
    """lm-eval's local-completions model pointed at the server: its loglikelihoods (echo, max_tokens 1,
    logprobs 1) equal lm-eval's own HF backend on the same checkpoint."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    pairs = [
        ("The bee reads the data.", " It learns"),
        ("Question: what do bees like?\nAnswer:", " flowers in the garden"),
        ("蜜蜂喜欢", "花园里的花。"),
        ("1, 2, 3,", " 4"),
    ]
    requests_ = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    api = LocalCompletionsAPI(
        base_url=server + "/v1/completions", model=MODEL, tokenizer=str(model_dir),
        tokenizer_backend="huggingface", batch_size=2, max_length=CONTEXT,
    )  # fmt: skip
    through_server = api.loglikelihood(requests_, disable_tqdm=True)
    hf_backend = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=1)
    expected = hf_backend.loglikelihood(requests_, disable_tqdm=True)
    worst = max(abs(a[0] - b[0]) for a, b in zip(through_server, expected))
    assert [a[1] for a in through_server] == [b[1] for b in expected]  # is_greedy
    assert worst < TOLERANCE, worst
    print(f"lm-eval local-completions vs HF backend: largest difference {worst:.2e}")
