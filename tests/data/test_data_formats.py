"""Readers: every format, JSON and JSONL, files and directories; located errors for each kind of bad record."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bumblecore.data.adapters import ADAPTERS
from bumblecore.data.formats import ReadReport, read_samples
from bumblecore.data.sources import DataError
from bumblecore.recipes import recipe_for


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


ALPACA = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be exact."}
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
TOOLS = {
    "conversations": [
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
        {"from": "observation", "value": "rain"},
        {"from": "gpt", "value": "It rains."},
    ],
    "tools": '[{"name": "weather", "description": "w", "parameters": {"type": "object"}}]',
}
PREF_ALPACA = {"instruction": "Pick", "input": "", "chosen": "good", "rejected": "bad"}
PREF_SHAREGPT = {
    "conversations": [{"from": "human", "value": "q"}],
    "chosen": {"from": "gpt", "value": "a"},
    "rejected": {"from": "gpt", "value": "b"},
}


def test_every_format_from_json_and_jsonl(tmp_path):
    alpaca = list(read_samples(write_json(tmp_path / "a.json", [ALPACA]), recipe_for("sft").reading))[0]
    assert alpaca.conversation.messages == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    tools = list(read_samples(write_jsonl(tmp_path / "t.jsonl", [TOOLS]), recipe_for("sft").reading))[0]
    assert tools.conversation.tools == [
        {"type": "function", "function": {"name": "weather", "description": "w", "parameters": {"type": "object"}}}
    ]
    assert [m["role"] for m in tools.conversation.messages] == ["user", "assistant", "tool", "assistant"]
    assert tools.conversation.messages[1]["tool_calls"] == [{"name": "weather", "arguments": {"city": "Oslo"}}]
    pref = list(read_samples(write_jsonl(tmp_path / "p.jsonl", [PREF_ALPACA]), recipe_for("dpo").reading))[0]
    assert pref.chosen["content"] == "good" and pref.rejected["content"] == "bad"
    pref2 = list(read_samples(write_json(tmp_path / "p2.json", [PREF_SHAREGPT]), recipe_for("dpo").reading))[0]
    assert pref2.conversation.messages == [{"role": "user", "content": "q"}] and pref2.chosen["content"] == "a"
    text = list(read_samples(write_jsonl(tmp_path / "x.jsonl", [{"text": "doc"}]), recipe_for("pretrain").reading))[0]
    assert text.text == "doc"


def test_directory_and_several_files_and_empty_tools(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", [SHAREGPT, {**SHAREGPT, "tools": "[]"}])
    write_json(folder / "2.json", [SHAREGPT])
    samples = list(read_samples(str(folder), recipe_for("sft").reading))
    assert len(samples) == 3 and all(s.conversation.tools is None for s in samples)
    assert samples[2].where.endswith("2.json record 1")


def test_streamed_json_array_matches_json_load(tmp_path):
    records = [{"text": "长文本 " * (i % 50) + str(i), "n": [i, {"x": "]},"}]} for i in range(300)]
    file = write_json(tmp_path / "big.json", records)
    import bumblecore.data.sources as sources

    with open(file, encoding="utf-8") as handle:
        streamed = [r for _, r in sources._iter_json_array(file, handle, chunk_size=97)]
    assert streamed == records


@pytest.mark.parametrize(
    "records,fmt,message",
    [
        ([SHAREGPT, "BROKEN"], "jsonl", r"line 2: not valid JSON"),
        ([ALPACA, {"instruction": "x"}], "jsonl", r'line 2: missing field "output"'),
        ([ALPACA, {"instruction": "x", "output": "   "}], "json", r'record 2: field "output" is empty'),
        (
            [{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}],
            "jsonl",
            r'line 1: field "conversations" turn 1 has role "gpt" out of order',
        ),
        (
            [{"conversations": [{"from": "human", "value": "a"}, {"from": "gtp", "value": "b"}]}],
            "jsonl",
            r'line 1: field "conversations" turn 2 has role "gtp"; expected system, human',
        ),
        (
            [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]}],
            "json",
            r'record 1: field "conversations" turn 2 \(gpt\) is an empty assistant turn',
        ),
        (
            [
                {
                    "conversations": [
                        {"from": "human", "value": "a"},
                        {"from": "gpt", "value": "b"},
                        {"from": "human", "value": "c"},
                    ]
                }
            ],
            "jsonl",
            r'line 1: field "conversations" must end on an assistant turn',
        ),
        ([{**TOOLS, "tools": "[{oops"}], "jsonl", r'line 1: field "tools" is not valid JSON'),
        (
            [{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "not json"}]}],
            "jsonl",
            r"turn 2 \(function_call\) is not valid JSON",
        ),
    ],
)
def test_bad_records_name_file_place_and_field(tmp_path, records, fmt, message):
    path = tmp_path / f"bad.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    else:
        write_json(path, records)
    with pytest.raises(DataError, match=message) as info:
        list(read_samples(path, recipe_for("sft").reading))
    assert str(path) in str(info.value)


def test_skip_bad_records_reports_where(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join([json.dumps(ALPACA), "{broken", json.dumps({"instruction": "x"}), json.dumps(ALPACA)]) + "\n"
    )
    report = ReadReport()
    samples = list(read_samples(path, recipe_for("sft").reading, skip_bad_records=True, report=report))
    assert len(samples) == 2 and report.records == 2
    assert len(report.skipped) == 2 and "line 2" in report.skipped[0] and "line 3" in report.skipped[1]


def test_wrong_stage_is_named(tmp_path):
    with pytest.raises(DataError, match="do not suit training_stage dpo"):
        list(read_samples(write_jsonl(tmp_path / "a.jsonl", [ALPACA]), recipe_for("dpo").reading))


@pytest.mark.slow
def test_cli_bad_record_exits_nonzero_without_traceback(tmp_path, tokenizer_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ALPACA) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    for command in ("inspect_data", "prepare_data"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bumblecore",
                command,
                "--model_name_or_path",
                str(tokenizer_dir),
                "--dataset_path",
                str(data),
                "--cache_dir",
                str(tmp_path / "cache"),
            ],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 1
        assert f'{data} line 2: missing field "output"' in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# ---------------------------------------------------------------- data the ecosystem writes (LLaMA-Factory, glaive/xLAM, OpenAI, TRL)

WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "weather", "description": "w", "parameters": {"type": "object"}}}
]
OSLO, BERGEN = {"name": "weather", "arguments": {"city": "Oslo"}}, {"name": "weather", "arguments": {"city": "Bergen"}}
PARALLEL_SHAREGPT = {
    "conversations": [  # LLaMA-Factory: a function_call whose value is a JSON list of calls
        {"from": "human", "value": "weather in Oslo and Bergen?"},
        {"from": "function_call", "value": json.dumps([OSLO, BERGEN])},
        {"from": "observation", "value": "rain"},
        {"from": "observation", "value": "snow"},
        {"from": "gpt", "value": "Rain and snow."},
    ],
    "tools": json.dumps([t["function"] for t in WEATHER_TOOLS]),
}
PARALLEL_MESSAGES = [
    {"role": "user", "content": "weather in Oslo and Bergen?"},
    {"role": "assistant", "content": "", "tool_calls": [OSLO, BERGEN]},
    {"role": "tool", "content": "rain"},
    {"role": "tool", "content": "snow"},
    {"role": "assistant", "content": "Rain and snow."},
]
CALL_BLOCK = '<tool_call>\n{{"name": "weather", "arguments": {{"city": "{}"}}}}\n</tool_call>'
TWO_CALLS = CALL_BLOCK.format("Oslo") + "\n" + CALL_BLOCK.format("Bergen")


def trained_and_text(tok, messages, tools=None):
    """(the trained text of each assistant turn, the whole rendered text) via encode_conversation."""
    from bumblecore.chat.format import encode_conversation

    ids, mask = encode_conversation(tok, messages, tools)
    runs, current = [], []
    for token, trained in zip(ids, mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tok.decode(run) for run in runs], tok.decode(ids)


def one_sample(tmp_path, record, stage="sft"):
    samples = list(read_samples(write_jsonl(tmp_path / "data.jsonl", [record]), recipe_for(stage).reading))
    assert len(samples) == 1
    return samples[0]


def test_sharegpt_parallel_calls_and_consecutive_observations(tmp_path, tok):
    sample = one_sample(tmp_path, PARALLEL_SHAREGPT)
    assert sample.conversation.messages == PARALLEL_MESSAGES and sample.conversation.tools == WEATHER_TOOLS
    trained, text = trained_and_text(tok, sample.conversation.messages, sample.conversation.tools)
    assert trained == [TWO_CALLS + "<|im_end|>", "Rain and snow.<|im_end|>"]
    assert text.endswith(  # Qwen2.5's rendering: the results share one user turn
        "<|im_start|>user\nweather in Oslo and Bergen?<|im_end|>\n<|im_start|>assistant\n" + TWO_CALLS + "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nrain\n</tool_response>\n<tool_response>\nsnow\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nRain and snow.<|im_end|>\n"
    )
    # glaive/xLAM style: one function_call turn per call, the same assistant message
    turns = PARALLEL_SHAREGPT["conversations"]
    split = {
        **PARALLEL_SHAREGPT,
        "conversations": [
            turns[0],
            {"from": "function_call", "value": json.dumps(OSLO)},
            {"from": "function_call", "value": json.dumps(BERGEN)},
            *turns[2:],
        ],
    }
    assert one_sample(tmp_path, split).conversation.messages == PARALLEL_MESSAGES


def test_sharegpt_text_beside_a_call_is_one_assistant_message(tmp_path, tok):
    record = {
        "conversations": [
            {"from": "human", "value": "weather in Oslo?"},
            {"from": "gpt", "value": "Let me look."},
            {"from": "function_call", "value": json.dumps(OSLO)},
            {"from": "observation", "value": "rain"},
            {"from": "gpt", "value": "Rain."},
        ]
    }
    messages = one_sample(tmp_path, record).conversation.messages
    assert messages[1] == {"role": "assistant", "content": "Let me look.", "tool_calls": [OSLO]} and len(messages) == 4
    trained, _ = trained_and_text(tok, messages, WEATHER_TOOLS)
    assert trained == ["Let me look.\n" + CALL_BLOCK.format("Oslo") + "<|im_end|>", "Rain.<|im_end|>"]


def test_openai_messages_read_as_the_same_conversation(tmp_path, tok):
    def openai_call(city):
        return {
            "id": f"call_{city}",
            "type": "function",
            "function": {"name": "weather", "arguments": json.dumps({"city": city})},
        }

    record = {
        "messages": [
            {"role": "user", "content": "weather in Oslo and Bergen?"},
            {"role": "assistant", "content": None, "tool_calls": [openai_call("Oslo"), openai_call("Bergen")]},
            {"role": "tool", "tool_call_id": "call_Oslo", "content": "rain"},
            {"role": "tool", "tool_call_id": "call_Bergen", "content": [{"type": "text", "text": "snow"}]},
            {"role": "assistant", "content": "Rain and snow."},
        ],
        "tools": WEATHER_TOOLS,
    }
    sample = one_sample(tmp_path, record)
    assert sample.conversation.messages == PARALLEL_MESSAGES and sample.conversation.tools == WEATHER_TOOLS
    sharegpt = one_sample(tmp_path, PARALLEL_SHAREGPT).conversation
    assert trained_and_text(tok, sample.conversation.messages, WEATHER_TOOLS) == trained_and_text(
        tok, sharegpt.messages, sharegpt.tools
    )
    plain = one_sample(
        tmp_path,
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        },
    )
    assert trained_and_text(tok, plain.conversation.messages)[0] == ["hello<|im_end|>"]


def test_trl_preference_explicit_and_implicit_prompt(tmp_path, tok):
    from bumblecore.chat.format import encode_preference

    prompt = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "3 or 5, which is bigger?"}]
    good, bad = {"role": "assistant", "content": "5"}, {"role": "assistant", "content": "3"}
    explicit = one_sample(tmp_path, {"prompt": prompt, "chosen": [good], "rejected": [bad]}, "dpo")
    implicit = one_sample(tmp_path, {"chosen": prompt + [good], "rejected": prompt + [bad]}, "dpo")
    for sample in (explicit, implicit):
        assert sample.kind == "preference" and sample.conversation.messages == prompt
        assert (sample.chosen, sample.rejected) == (good, bad)
    ids, mask = encode_preference(tok, explicit.conversation.messages, explicit.chosen)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "5<|im_end|>"
    # a ShareGPT preference pair whose chosen reply makes parallel calls
    calls = one_sample(
        tmp_path,
        {
            "conversations": PARALLEL_SHAREGPT["conversations"][:1],
            "chosen": {"from": "function_call", "value": json.dumps([OSLO, BERGEN])},
            "rejected": {"from": "gpt", "value": "No idea."},
        },
        "dpo",
    )
    ids, mask = encode_preference(tok, calls.conversation.messages, calls.chosen, WEATHER_TOOLS)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == TWO_CALLS + "<|im_end|>"


HUMAN = {"from": "human", "value": "q"}
GPT = {"from": "gpt", "value": "a"}
USER, ASSISTANT = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    "record,stage,message",
    [
        (
            {"conversations": [HUMAN, {"from": "function_call", "value": "[]"}]},
            "sft",
            r'line 1: field "conversations" turn 2 \(function_call\) is an empty list of calls',
        ),
        (
            {"conversations": [HUMAN, {"from": "function_call", "value": json.dumps([OSLO, {"arguments": {}}])}]},
            "sft",
            r'line 1: field "conversations" turn 2 \(function_call\) call 2 needs a JSON object with "name"',
        ),
        (
            {
                "conversations": [
                    HUMAN,
                    {"from": "function_call", "value": json.dumps({**OSLO, "content": "Let me look."})},
                ]
            },
            "sft",
            r"turn 2 \(function_call\) has fields \['content'\] besides name and arguments",
        ),
        (
            {"conversations": [HUMAN, {"from": "function_call", "value": json.dumps(OSLO)}, GPT]},
            "sft",
            r'line 1: field "conversations" turn 3 \(gpt\) follows a function_call turn: text after a call needs',
        ),
        (
            {"conversations": [HUMAN, GPT, GPT]},
            "sft",
            r'line 1: field "conversations" turn 3 \(gpt\) follows another gpt turn',
        ),
        (
            {"conversations": [HUMAN, {"from": "observation", "value": "r"}, GPT]},
            "sft",
            r'turn 2 has role "observation" out of order; expected the assistant side',
        ),
        (
            {"messages": [USER, {"role": "bot", "content": "a"}]},
            "sft",
            r'line 1: field "messages" message 2 has role "bot"; expected system, user, assistant, tool',
        ),
        (
            {"messages": [USER, ASSISTANT, {"role": "tool", "content": "r"}, ASSISTANT]},
            "sft",
            r'line 1: field "messages" message 3 \(tool\) must follow an assistant message with tool_calls',
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}],
                    },
                ]
            },
            "sft",
            r'line 1: field "messages" message 2 tool_calls 1 needs a JSON object with "name"',
        ),
        (
            {"messages": [USER, {"role": "assistant", "content": "  "}]},
            "sft",
            r'field "messages" message 2 is an empty assistant message',
        ),
        ({"messages": [USER, {**ASSISTANT, "weight": 0}]}, "sft", r'field "messages" message 2 has "weight": 0'),
        (
            {"messages": [{"role": "user", "content": 7}, ASSISTANT]},
            "sft",
            r'field "messages" message 1 content must be a string',
        ),
        ({"messages": [USER, ASSISTANT, USER]}, "sft", r'line 1: field "messages" must end on an assistant message'),
        (
            {"messages": [ASSISTANT]},
            "sft",
            r'field "messages" message 1 \(assistant\) must follow a user or tool message',
        ),
        (
            {"prompt": [USER], "chosen": [ASSISTANT, ASSISTANT], "rejected": [ASSISTANT]},
            "dpo",
            r'line 1: field "chosen" holds 2 messages; a preference pair compares one assistant reply',
        ),
        (
            {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [USER]},
            "dpo",
            r'field "rejected" message 1 has role "user"; expected assistant',
        ),
        (
            {"prompt": [USER, ASSISTANT], "chosen": [ASSISTANT], "rejected": [ASSISTANT]},
            "dpo",
            r'field "prompt" must end on a user or tool message',
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "dpo", r'line 1: field "prompt" is a string'),
        (
            {"chosen": [USER, ASSISTANT], "rejected": [{"role": "user", "content": "other"}, ASSISTANT]},
            "dpo",
            r'line 1: fields "chosen" and "rejected" differ at message 1, before their last',
        ),
        ({"chosen": [USER, ASSISTANT]}, "sft", r"cannot tell the format"),
    ],
)
def test_ecosystem_records_rejected_with_file_line_and_field(tmp_path, record, stage, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=message) as info:
        list(read_samples(path, recipe_for(stage).reading))
    assert str(info.value).startswith(f"{path} line 1: ")


def test_the_format_names_docs_give_are_the_ones_errors_print(tmp_path):
    """docs/DATA_FORMAT.md's table of format names is the adapters' table, and its example error is the
    one the reader raises for that record and stage."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "DATA_FORMAT.md").read_text(encoding="utf-8")
    table = [line.split("|")[1] for line in doc.splitlines() if line.startswith("| `")]
    assert {name for cell in table for name in re.findall(r"`(\w+)`", cell)} == set(ADAPTERS)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "Add", "chosen": "5", "rejected": "6"}])
    with pytest.raises(DataError) as info:
        list(read_samples(pairs, recipe_for("sft").reading))
    assert f"error: {str(info.value).replace(str(pairs), 'data/pairs.jsonl')}\n" in doc
