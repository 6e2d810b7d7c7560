"""`bumblecore serve` in-process, through the real `openai` client: answers equal `bumblecore generate`'s
(and the engine's, for sampled and multi-turn requests), OpenAI-style errors for bad requests and keys,
concurrent and disconnecting clients, a 64-stream load, and the chat page in a headless Chromium."""

import asyncio
import concurrent.futures
import json
import shutil
import time
from pathlib import Path

import pytest
import requests
from serving import running_server, xgrammar_or_skip

from bumblecore.inference.commands import build_prompt_ids, generate
from bumblecore.inference.generate import GenerationEngine, SamplingParams
from bumblecore.inference.loading import load_for_inference
from bumblecore.inference.sampling import SamplingArgs
from bumblecore.inference.serve_settings import ServeSettings
from bumblecore.inference.serving_worker import EngineAPI

pytestmark = pytest.mark.slow  # starts processes, servers or whole pipelines

openai = pytest.importorskip("openai")

KEY = "test-key"
CONTEXT = 512
DEMO_TOKENIZER = "bumblecore/demo_data/tokenizer"
PROMPTS = [
    "hello bee",
    "蜜蜂喜欢花园里的花。",
    "The teacher counts 42 tokens?",
    "A small model",
    "你好",
    "numbers 1, 2, 3",
    "My friend learns from a long story!",
    "小模型学习",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_checkpoint):
    """A tiny random Qwen2 with the demo tokenizer; its own context is long (for the slot test),
    the main server uses 512 tokens of it."""
    return tiny_checkpoint(tmp_path_factory.mktemp("serve_model"), max_position_embeddings=32768)


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(str(model_dir), api_key=KEY, max_batch_size=16, max_model_len=CONTEXT) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The engine's own answers, as the server should give them: `reference(messages, max_tokens, **params)`
    for one, `reference.many([(messages, max_tokens), ...])` for several, decoded together (exact)."""
    from bumblecore.chat.format import render_prompt

    model, tokenizer, eos = load_for_inference(str(model_dir), device_map="cpu")
    engine = GenerationEngine(model, tokenizer, max_batch_size=16, max_len=CONTEXT, eos_token_ids=eos)

    def many(jobs, tools=None, **params) -> list[dict]:
        results, order = {}, []
        for messages, max_tokens in jobs:
            ids = render_prompt(tokenizer, user(messages) if isinstance(messages, str) else messages, tools)
            request_id = engine.add(ids, SamplingParams(max_new_tokens=max_tokens, **params), live_text=False)
            results[request_id] = {"text": "", "token_ids": [], "finish_reason": None, "prompt_tokens": len(ids)}
            order.append(request_id)
        while engine.active:
            for event in engine.step():
                result = results[event.request_id]
                result["text"] += event.text
                result["token_ids"].append(event.token_id)
                result["finish_reason"] = event.finish_reason
        return [results[i] for i in order]

    def answer(messages, max_tokens, tools=None, **params) -> dict:
        return many([(messages, max_tokens)], tools, **params)[0]

    answer.many = many
    return answer


def user(text):
    return [{"role": "user", "content": text}]


def test_answers_equal_bumblecore_generate(server, client, model_dir, capsys, reference):
    generate(str(model_dir), prompt="hello bee", sampling=SamplingArgs(max_new_tokens=12), device_map="cpu")
    expected = capsys.readouterr().out[:-1]
    assert expected
    reply = client.chat.completions.create(model="bumblebee", messages=user("hello bee"), max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    oracle = reference("hello bee", 12)
    assert reply.choices[0].finish_reason == oracle["finish_reason"]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        oracle["prompt_tokens"],
        len(oracle["token_ids"]),
    )
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="bumblebee",
            messages=user("hello bee"),
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == oracle["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(oracle["token_ids"])


def test_roles_tools_and_list_content_go_through_the_chat_template(client, reference):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "count_words",
                "description": "count words",
                "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "system", "content": "You count words."},
        {"role": "user", "content": "How many words: fox owl cup"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "count_words", "arguments": '{"text": "fox owl cup"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        {"role": "user", "content": [{"type": "text", "text": "And in "}, {"type": "text", "text": "中文?"}]},
    ]
    reply = client.chat.completions.create(
        model="bumblebee", messages=messages, tools=tools, max_tokens=10, temperature=0
    )
    template_messages = messages[:2] + [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": messages[2]["tool_calls"][0]["function"]}],
        },
        {"role": "tool", "content": "3"},
        {"role": "user", "content": "And in 中文?"},
    ]
    expected = reference(template_messages, 10, tools=tools)["text"]
    assert reply.choices[0].message.content == expected
    chunks = client.chat.completions.create(
        model="bumblebee", messages=messages, tools=tools, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_tool_call_blocks_become_tool_calls_however_the_text_is_split():
    from bumblecore.inference.openai_reply import ToolCallStream, merge_deltas

    text = (
        'Let me count.\n<tool_call>\n{"name": "count_words", "arguments": {"text": "狐狸 owl"}}\n</tool_call>\n'
        "<tool_call>\nnot json\n</tool_call> done <tool"
    )

    def reply(pieces):
        stream = ToolCallStream()
        deltas = [d for piece in pieces for d in stream.push(piece)] + stream.finish()
        message = merge_deltas(deltas)
        for call in message.get("tool_calls", []):
            assert call.pop("id").startswith("call_")
        return message

    expected = {
        "role": "assistant",
        "content": "Let me count.\n\n<tool_call>\nnot json\n</tool_call> done <tool",
        "tool_calls": [{"type": "function", "function": {"name": "count_words", "arguments": '{"text": "狐狸 owl"}'}}],
    }
    assert reply([text]) == expected
    assert reply(list(text)) == expected  # one character at a time, as a stream may deliver it
    for cut in range(len(text) + 1):
        assert reply([text[:cut], text[cut:]]) == expected
    assert reply(["no tools <tool_ here"]) == {"role": "assistant", "content": "no tools <tool_ here"}


WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "now"}},
]


def test_tool_choice_forces_valid_calls(server, client):
    """tool_choice required and a named function on a random model, through the openai client, whole and
    streamed: every choice is one call of an offered function whose arguments validate against its
    parameters (jsonschema), finish_reason tool_calls, within max_tokens. tool_choice none answers as
    the same request without tools; bad values are 400s naming the field."""
    jsonschema = xgrammar_or_skip()
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = dict(model="bumblebee", messages=user("weather in Rome?"), tools=TOOLS, max_tokens=120, temperature=1.0)
    replies = [
        client.chat.completions.create(**body, tool_choice=named, n=2, seed=3),
        client.chat.completions.create(**body, tool_choice="required", parallel_tool_calls=False, n=2, seed=5),
    ]
    for reply in replies:
        assert reply.usage.completion_tokens <= 2 * 120
        for choice in reply.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
            (call,) = choice.message.tool_calls
            assert call.type == "function" and call.id.startswith("call_")
            assert call.function.name == "get_weather" or reply is replies[1] and call.function.name == "now"
            jsonschema.validate(
                json.loads(call.function.arguments),
                WEATHER if call.function.name == "get_weather" else {"maxProperties": 0},
            )
    chunks = list(client.chat.completions.create(**body, tool_choice=named, seed=3, stream=True))
    streamed = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    first = replies[0].choices[0].message.tool_calls[0].function
    assert [(c.function.name, c.function.arguments) for c in streamed] == [(first.name, first.arguments)]  # same seed

    greedy = dict(model="bumblebee", messages=user("weather in Rome?"), max_tokens=8, temperature=0)
    none = client.chat.completions.create(**greedy, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == client.chat.completions.create(**greedy).choices[0].message.content
    headers = {"Authorization": f"Bearer {KEY}"}
    for tool_choice, param in [
        ({"type": "function", "function": {"name": "nowhere"}}, "tool_choice"),
        ("always", "tool_choice"),
        ({"type": "function"}, "tool_choice"),
    ]:
        bad = requests.post(
            server + "/v1/chat/completions",
            json={**greedy, "tools": TOOLS, "tool_choice": tool_choice},
            headers=headers,
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
    bad = requests.post(server + "/v1/chat/completions", json={**greedy, "tool_choice": "required"}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice", bad.text


def test_extras_and_limits_reach_the_engine(client, reference):
    sampled = dict(temperature=0.8, top_p=0.9, seed=5, extra_body={"top_k": 20, "repetition_penalty": 1.3})
    reply = client.chat.completions.create(model="bumblebee", messages=user("蜜蜂"), max_tokens=16, **sampled)
    expected = reference(
        "蜜蜂", 16, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.3, seed=5
    )
    assert reply.choices[0].message.content == expected["text"]
    again = client.chat.completions.create(model="bumblebee", messages=user("蜜蜂"), max_tokens=16, **sampled)
    assert again.choices[0].message.content == expected["text"]  # seeded: reproducible

    reply = client.chat.completions.create(
        model="bumblebee",
        messages=user("A small model"),
        max_completion_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == 7 and reply.choices[0].finish_reason == "length"

    free = reference("A small model", 30, ignore_eos=True)["text"]
    stop = free[8:11]
    reply = client.chat.completions.create(
        model="bumblebee",
        messages=user("A small model"),
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].message.content == free[: free.index(stop)] and reply.choices[0].finish_reason == "stop"

    # More than the context leaves: generate to the context's end, finish_reason "length".
    reply = client.chat.completions.create(
        model="bumblebee", messages=user("hi"), max_tokens=100_000, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.usage.total_tokens == CONTEXT and reply.choices[0].finish_reason == "length"


def test_models_health_page_and_api_key(server, client):
    assert [m.id for m in client.models.list().data] == ["bumblebee"]
    assert client.models.retrieve("bumblebee").id == "bumblebee"
    assert requests.get(server + "/health", timeout=10).status_code == 200  # no key needed
    page = requests.get(server + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and 'id="api-key"' in page.text
    assert requests.get(server + "/web/chat.js", timeout=10).status_code == 200

    wrong = openai.OpenAI(base_url=server + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.chat.completions.create(model="bumblebee", messages=user("hi"), max_tokens=2)
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    for headers in ({}, {"Authorization": "Basic " + KEY}, {"X-API-Key": KEY}):
        for method, path in (("post", "/v1/chat/completions"), ("get", "/v1/models")):
            reply = getattr(requests, method)(server + path, json={"messages": user("hi")}, headers=headers, timeout=10)
            assert reply.status_code == 401
            assert (
                reply.json()["error"]["type"] == "invalid_request_error"
                and "Bearer" in reply.json()["error"]["message"]
            )


def test_with_a_key_the_api_docs_need_it_too(server):
    for path in ("/docs", "/redoc", "/openapi.json", "/info"):
        reply = requests.get(server + path, timeout=10)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key", path
    reply = requests.get(server + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert reply.status_code == 200 and "/v1/chat/completions" in reply.json()["paths"]


def test_without_a_key_any_key_is_accepted():
    class FakeRequest:
        def __init__(self, path, headers):
            self.url, self.headers = type("URL", (), {"path": path})(), headers

    open_api = EngineAPI.__new__(EngineAPI)
    open_api.settings = ServeSettings("unused")
    for headers in ({}, {"authorization": "Bearer dummy"}, {"authorization": "whatever"}):
        asyncio.run(open_api.authorize(FakeRequest("/v1/chat/completions", headers)))
    keyed = EngineAPI.__new__(EngineAPI)
    keyed.settings = ServeSettings("unused", api_key="k")
    asyncio.run(keyed.authorize(FakeRequest("/v1/models", {"authorization": "Bearer k"})))
    asyncio.run(keyed.authorize(FakeRequest("/health", {})))


MESSAGES = user("hi")


def test_server_flags_are_defaults_for_fields_a_request_leaves_out(monkeypatch):
    from bumblecore.inference import serve
    from bumblecore.inference.openai_request import parse_chat_request
    from bumblecore.inference.serving_http import sampling_params

    settings = ServeSettings(
        "unused", sampling=SamplingArgs(max_new_tokens=40, do_sample=False, top_k=7, repetition_penalty=1.2)
    )
    omitted = sampling_params(parse_chat_request({"messages": MESSAGES}), settings, CONTEXT)
    assert (omitted.max_new_tokens, omitted.do_sample, omitted.top_k, omitted.repetition_penalty) == (40, False, 7, 1.2)
    given = sampling_params(
        parse_chat_request({"messages": MESSAGES, "max_tokens": 5, "temperature": 0.5, "top_k": 0}), settings, CONTEXT
    )
    assert (given.max_new_tokens, given.do_sample, given.temperature, given.top_k) == (5, True, 0.5, 0)
    greedy = sampling_params(
        parse_chat_request({"messages": MESSAGES, "temperature": 0}), ServeSettings("unused"), CONTEXT
    )
    assert not greedy.do_sample and greedy.max_new_tokens == CONTEXT  # no max_tokens anywhere: to the context's end

    started = []
    monkeypatch.setattr(serve, "context_length", lambda *args: CONTEXT)
    monkeypatch.setattr(serve, "check_tokenizer_fits", lambda *args: None)
    monkeypatch.setattr(serve, "model_dirs", lambda *args: (Path("unused"), Path("unused")))  # no model there
    monkeypatch.setattr(
        serve,
        "BumbleServer",
        lambda settings: type("S", (), {"run": lambda self, **kw: started.append((settings, kw))})(),
    )
    monkeypatch.setattr(serve.signal, "signal", lambda *args: None)  # keep this process's SIGTERM handler
    monkeypatch.setenv("BUMBLECORE_API_KEY", "from-env")
    serve.serve("unused")
    assert (
        started[0][0].api_key == "from-env" and started[0][1]["host"] == "127.0.0.1" and started[0][1]["port"] == 8000
    )
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        serve.serve("unused", sampling=SamplingArgs(top_p=0))


BAD_REQUESTS = [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_type"),
    ({}, 400, "messages", "missing_field"),
    ({"messages": "hi"}, 400, "messages", "invalid_type"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "missing_field"),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content", "invalid_type"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        400,
        "messages[0].content[0]",
        "invalid_value",
    ),
    ({"messages": ["hi"]}, 400, "messages[0]", "invalid_type"),
    ({"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"messages": MESSAGES, "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ({"messages": MESSAGES, "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    ({"messages": MESSAGES, "max_completion_tokens": 1.5}, 400, "max_completion_tokens", "invalid_type"),
    ({"messages": MESSAGES, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"messages": MESSAGES, "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"messages": MESSAGES, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"messages": MESSAGES, "top_k": -1}, 400, "top_k", "invalid_value"),
    ({"messages": MESSAGES, "stream": "yes"}, 400, "stream", "invalid_type"),
    ({"messages": MESSAGES, "stop": [1]}, 400, "stop", "invalid_type"),
    ({"messages": MESSAGES, "n": 0}, 400, "n", "invalid_value"),
    ({"messages": MESSAGES, "seed": "s"}, 400, "seed", "invalid_type"),
    ({"messages": user("bee " * 1000)}, 400, "messages", "context_length_exceeded"),
    ({"messages": user("x" * 2_000_000)}, 413, None, "request_too_large"),
    ({"messages": MESSAGES, "model": "gpt-4"}, 404, "model", "model_not_found"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, reference):
    auth = {"Authorization": f"Bearer {KEY}"}
    for body, status, param, code in BAD_REQUESTS:
        kwargs = (
            {"data": body, "headers": {**auth, "Content-Type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body, "headers": auth}
        )
        reply = requests.post(server + "/v1/chat/completions", timeout=10, **kwargs)
        assert reply.status_code == status, (body if len(str(body)) < 200 else param, reply.text)
        error = reply.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error
        assert error["message"]
    reply = requests.get(server + "/v1/nowhere", headers=auth, timeout=10)
    assert reply.status_code == 404 and reply.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="bumblebee", messages=[{"role": "robot", "content": "hi"}])
    reply = client.chat.completions.create(model="bumblebee", messages=user("hello bee"), max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == reference("hello bee", 6)["text"]


def ask(client, prompt, max_tokens, stream):
    if not stream:
        reply = client.chat.completions.create(
            model="bumblebee", messages=user(prompt), max_tokens=max_tokens, temperature=0
        )
        return reply.choices[0].message.content
    chunks = client.chat.completions.create(
        model="bumblebee", messages=user(prompt), max_tokens=max_tokens, temperature=0, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_concurrent_requests_each_get_their_own_answer(client, reference):
    jobs = [(PROMPTS[i % len(PROMPTS)], 6 + i, i % 2 == 0) for i in range(12)]
    expected = [r["text"] for r in reference.many([(prompt, max_tokens) for prompt, max_tokens, _ in jobs])]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(client, *job), jobs, timeout=120))
    assert answers == expected


def open_stream(server, prompt, max_tokens, extra=None):
    body = {
        "model": "bumblebee",
        "messages": user(prompt),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        **(extra or {}),
    }
    return requests.post(
        server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, stream=True, timeout=60
    )


def read_stream(reply) -> tuple[str, list]:
    text, reasons = [], []
    for line in reply.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for choice in chunk["choices"]:
            text.append(choice["delta"].get("content") or "")
            reasons.append(choice["finish_reason"])
    return "".join(text), [r for r in reasons if r]


def test_load_64_streams_some_disconnecting(server, client, reference):
    expected = dict(zip(PROMPTS, (r["text"] for r in reference.many([(p, 20) for p in PROMPTS]))))

    def one(index):
        prompt = PROMPTS[index % len(PROMPTS)]
        with open_stream(server, prompt, 20) as reply:
            if index % 4 == 0:  # hang up after the first chunk
                next(reply.iter_lines())
                return None
            return prompt, read_stream(reply)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64), timeout=180))
    finished = [r for r in results if r is not None]
    assert len(finished) == 48
    for prompt, (text, reasons) in finished:
        assert text == expected[prompt] and len(reasons) == 1
    assert ask(client, "hello bee", 8, stream=True) == reference("hello bee", 8)["text"]


def test_slow_readers_get_coalesced_deltas_with_the_engines_text(server, client, reference):
    """Streams read slowly fall behind the engine: the tokens that waited go out as multi-token
    deltas, and each reply still concatenates to the engine's own greedy text (and usage count);
    non-streaming replies alongside are equal too."""
    prompts = PROMPTS[:6]
    expected = reference.many([(p, 24) for p in prompts], ignore_eos=True)

    def slow(prompt):
        with open_stream(server, prompt, 24, {"ignore_eos": True, "stream_options": {"include_usage": True}}) as reply:
            text, chunks, tokens = [], 0, None
            for line in reply.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        text.append(choice["delta"]["content"])
                        chunks += 1
                        time.sleep(0.05)  # a slow reader: the engine runs ahead
            return "".join(text), chunks, tokens

    def plain(prompt):
        return (
            client.chat.completions.create(
                model="bumblebee", messages=user(prompt), max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
            )
            .choices[0]
            .message.content
        )

    with concurrent.futures.ThreadPoolExecutor(len(prompts) * 2) as pool:
        streams = list(pool.map(slow, prompts, timeout=120))
        replies = list(pool.map(plain, prompts, timeout=120))
    assert [s[0] for s in streams] == [r["text"] for r in expected] == replies
    assert all(tokens == 24 for _, _, tokens in streams)
    assert any(chunks < 24 for _, chunks, _ in streams)  # some deltas held several tokens


def test_a_disconnected_stream_frees_its_slot(model_dir):
    """One slot and a 32k context: a stream left running would hold the slot for tens of seconds.
    Also: --training_stage pretrain serves raw-text completion, and with no key any key works."""
    with running_server(str(model_dir), training_stage="pretrain", max_batch_size=1, max_model_len=32768) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="dummy", max_retries=0, timeout=60)
        chunks = client.chat.completions.create(
            model="bumblebee",
            messages=user("The brave fox"),
            max_tokens=32000,
            stream=True,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        for _, _ in zip(range(3), chunks):
            pass
        chunks.close()
        started = time.monotonic()
        reply = client.chat.completions.create(
            model="bumblebee", messages=user("The brave fox"), max_tokens=8, temperature=0
        )
        assert time.monotonic() - started < 15
        # A non-streaming client that gives up frees the slot too (the server polls for the hang-up).
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(
                url + "/v1/chat/completions",
                timeout=1.5,
                json={"messages": user("The brave fox"), "max_tokens": 32000, "ignore_eos": True, "temperature": 0},
            )
        started = time.monotonic()
        again = client.chat.completions.create(
            model="bumblebee", messages=user("The brave fox"), max_tokens=8, temperature=0
        )
        assert time.monotonic() - started < 15 and again.choices[0].message.content == reply.choices[0].message.content

    model, tokenizer, eos = load_for_inference(str(model_dir), device_map="cpu")
    ids = build_prompt_ids(tokenizer, "The brave fox", "pretrain")
    expected = GenerationEngine(model, tokenizer, 1, 64, eos_token_ids=eos).generate(
        [ids], SamplingParams(max_new_tokens=8)
    )[0]
    assert reply.choices[0].message.content == expected["text"] and reply.usage.prompt_tokens == len(ids)


def test_a_model_that_fails_to_load_stops_the_server_instead_of_hanging(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError, match="stopped while starting"):
        with running_server(str(broken), startup_timeout=120):
            pass


# ---------------------------------------------------------------------------- the page, in a real browser


def chromium_driver():
    """Debian's chromium + chromium-driver (.ci/run installs them when missing)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("no Chromium and chromedriver on this machine (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,760",
        "--lang=zh-CN",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_chat_page_in_a_real_browser(server, reference):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    # A question whose greedy reply is long enough to arrive in many pieces.
    candidates = ["你好，蜜蜂！", "蜜蜂喜欢花园里的花。", "The bee reads the data.", "老师计算 42 tokens?"]
    question, expected = max(
        zip(candidates, reference.many([(q, 100) for q in candidates])), key=lambda pair: len(pair[1]["token_ids"])
    )
    expected = expected["text"]
    driver = chromium_driver()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(server + "/")
        wait.until(lambda d: "needs an API key" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
        wait.until(lambda d: d.find_element(By.ID, "model-name").text == "model: bumblebee")
        for field, value in (("temperature", "0"), ("max-tokens", "100")):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value, Keys.TAB)
        driver.execute_script("""
            window.replyLengths = new Set();
            new MutationObserver(() => {
              const bodies = document.querySelectorAll('.message.assistant .body');
              if (bodies.length) window.replyLengths.add(bodies[bodies.length - 1].textContent.length);
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")
        driver.find_element(By.ID, "input").send_keys(question, Keys.ENTER)
        wait.until(
            lambda d: (
                d.find_elements(By.CSS_SELECTOR, ".message.assistant")
                and not d.find_elements(By.CSS_SELECTOR, ".message.streaming")
            )
        )
        assert driver.find_element(By.CSS_SELECTOR, ".message.user .body").text == question
        stored = json.loads(driver.execute_script("return localStorage.getItem('bumblecore.chat.v1')"))
        assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
        assert stored["messages"][1]["content"] == expected
        assert (
            len(driver.execute_script("return [...window.replyLengths].filter(n => n > 0)")) >= 3
        )  # streamed, not at once

        driver.refresh()  # the conversation and the key live in this browser
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#messages .message")) == 2)
        assert driver.find_element(By.ID, "api-key").get_attribute("value") == KEY
        other = chromium_driver()  # another browser (its own profile): its own, empty conversation
        try:
            other.get(server + "/")
            WebDriverWait(other, 30).until(lambda d: "needs an API key" in d.find_element(By.ID, "status").text)
            assert not other.find_elements(By.CSS_SELECTOR, "#messages .message")
        finally:
            other.quit()
        driver.find_element(By.ID, "new-chat").click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#messages .message"))
        assert json.loads(driver.execute_script("return localStorage.getItem('bumblecore.chat.v1')"))["messages"] == []

        html = driver.execute_script(
            "return renderMarkdown(arguments[0])",
            "<img src=x onerror=alert(1)> **bold** `a<b>`\n```\n<script>x()</script>\n```\n- one\n- 二",
        )
        assert "<img" not in html and "<script" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
        assert "<strong>bold</strong>" in html and "<code>a&lt;b&gt;</code>" in html
        assert "<pre><code>&lt;script&gt;x()&lt;/script&gt;</code></pre>" in html and "<li>one</li><li>二</li>" in html
    finally:
        driver.quit()
