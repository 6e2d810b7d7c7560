"""A stream's SSE framing without a server: deltas that wait for a stream go out as one chunk (the
same text), the end of a reply keeps OpenAI's finish / usage / [DONE] order, and the templated
content event is byte for byte what the general path writes."""

import asyncio
import json
from types import SimpleNamespace

from litserve.utils import LitAPIStatus

from bumblecore.inference.litserve_adapter import STEP_UID, ReplyBuffer, StepFanOut
from bumblecore.inference.openai_reply import chat_chunk
from bumblecore.inference.openai_request import parse_chat_request
from bumblecore.inference.serving_http import ChatCompletionsSpec, ContentFrame, Submission, sse


def spec(stream_interval=0.0):
    it = ChatCompletionsSpec.__new__(ChatCompletionsSpec)  # no model directory: only the stream's parts
    it.settings = SimpleNamespace(model_name="bumblebee", stream_interval=stream_interval)
    it.response_buffer = {}
    return it


def piece(text, finish_reason=None, tokens=1):
    return {"text": text, "finish_reason": finish_reason, "completion_tokens": tokens}, LitAPIStatus.OK


def events(body: str) -> list:
    return [json.loads(e[6:]) if e != "data: [DONE]" else e for e in body.split("\n\n") if e]


def run_stream(arrivals: list[list], include_usage=True, tools=None, gap=0.02, interval=0.0, times=None):
    """The stream's writes when the worker's messages arrive in these groups, `gap` seconds apart
    (one group per wait when the stream interval is 0); `times` gets the time of each write."""
    server = spec(interval)
    request = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    if include_usage:
        request["stream_options"] = {"include_usage": True}
    if tools:
        request["tools"] = tools
    chat = parse_chat_request(request)

    async def go():
        StepFanOut.install(server)
        replies = ReplyBuffer(server, "uid")
        submission = Submission("uid", replies, prompt_tokens=5)
        stream = server.stream_chunks(chat, [submission])

        async def feed():  # as the worker's step messages reach the buffers: through StepFanOut
            for group in arrivals:
                await asyncio.sleep(gap)  # the stream takes each group on its own
                server.response_buffer[STEP_UID].response_queue.append(([("uid", *m) for m in group], None))

        feeding = asyncio.ensure_future(feed())
        writes = []
        async for write in stream:
            writes.append(write)
            if times is not None:
                times.append(asyncio.get_running_loop().time())
        await feeding
        return writes

    return asyncio.run(asyncio.wait_for(go(), timeout=10))


def test_pieces_that_arrived_together_go_out_as_one_chunk():
    writes = run_stream(
        [[piece("Hel", tokens=1), piece("lo", tokens=2), piece(" b", tokens=3)], [piece("ee", "length", tokens=4)]]
    )
    assert [e["choices"][0]["delta"] for e in events(writes[1])] == [{"content": "Hello b"}]
    assert events(writes[2])[0]["choices"][0]["delta"] == {"content": "ee"}
    assert events(writes[2])[1]["choices"][0]["finish_reason"] == "length" and len(writes) == 3


def test_decode_steps_faster_than_the_stream_interval_go_out_together():
    """Tokens arriving every 5 ms on a stream with a 60 ms interval: the first goes out at once, the
    others at most once per interval, together; the text is the same as one chunk per arrival."""
    pieces = [[piece(c, tokens=i + 1)] for i, c in enumerate("abcdefghijklmnop")]
    pieces[-1] = [piece("p", "length", tokens=16)]
    times = []
    together = run_stream(pieces, gap=0.005, interval=0.06, times=times)
    apart = run_stream(pieces, gap=0.005)

    def text(writes):
        return "".join(e["choices"][0]["delta"].get("content", "") for w in writes[1:] for e in events(w)[:1])

    assert text(together) == text(apart) == "abcdefghijklmnop"
    assert len(together) < 8  # the role chunk, then ~80 ms of tokens, at most one chunk per 60 ms
    assert all(later - earlier >= 0.06 - 1e-3 for earlier, later in zip(times[1:], times[2:-1]))
    # The reply's end does not wait for the interval: its last chunk goes out as it arrives.
    times, ended = [], pieces[:3] + [[piece("d", "length", tokens=4), ("", LitAPIStatus.FINISH_STREAMING)]]
    assert text(run_stream(ended, gap=0.005, interval=5.0, times=times)) == "abcd"
    assert times[-1] - times[1] < 1.0


def test_the_end_of_a_reply_keeps_finish_usage_done():
    writes = run_stream([[piece("a", tokens=1), piece("b", "length", tokens=2), ("", LitAPIStatus.FINISH_STREAMING)]])
    chunks = [e for w in writes[1:] for e in events(w)]
    assert chunks[0]["choices"][0]["delta"] == {"content": "ab"}
    assert chunks[1]["choices"][0]["finish_reason"] == "length" and chunks[1]["choices"][0]["delta"] == {}
    assert chunks[2]["choices"] == [] and chunks[2]["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
    }
    assert chunks[3] == "data: [DONE]" and len(chunks) == 4
    without = [e for w in run_stream([[piece("a", "stop")]], include_usage=False)[1:] for e in events(w)]
    assert [c if isinstance(c, str) else c["choices"][0]["finish_reason"] for c in without] == [
        None,
        "stop",
        "data: [DONE]",
    ]


def test_an_error_after_some_pieces_reports_in_the_stream():
    writes = run_stream([[piece("a"), ({"error": "ValueError: boom"}, LitAPIStatus.ERROR)]])
    chunks = [e for w in writes[1:] for e in events(w)]
    assert chunks[0]["choices"][0]["delta"] == {"content": "a"}
    assert "boom" in chunks[1]["error"]["message"] and chunks[2] == "data: [DONE]"


def test_tool_calls_split_across_coalesced_pieces():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    text = 'ok<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    pieces = [piece(text[i : i + 5]) for i in range(0, len(text), 5)]
    pieces[-1] = piece(text[(len(pieces) - 1) * 5 :], "stop")
    once = [e for w in run_stream([pieces], tools=tools)[1:] for e in events(w)]
    apart = [e for w in run_stream([[p] for p in pieces], tools=tools)[1:] for e in events(w)]

    def calls(chunks):
        got = [c["choices"][0]["delta"].get("tool_calls") for c in chunks if not isinstance(c, str) and c["choices"]]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if not isinstance(c, str) and c["choices"]]
        calls = [[{k: v for k, v in call.items() if k != "id"} for call in g] for g in got if g]  # ids are random
        return calls, [r for r in reasons if r]

    assert calls(once) == calls(apart) and calls(once)[1] == ["tool_calls"]


def test_the_content_template_writes_what_the_general_path_writes():
    frame = ContentFrame("chatcmpl-1", 'bee"s', 123)
    for text in ["", "plain", 'quote " and \\ back', "蜜蜂\n\t", "\u2028 \x00 \ud7ff"]:
        assert frame({"content": text}) == sse(chat_chunk("chatcmpl-1", 'bee"s', {"content": text}, created=123))
    other = {"tool_calls": [{"index": 0}]}
    assert frame(other) == sse(chat_chunk("chatcmpl-1", 'bee"s', other, created=123))
