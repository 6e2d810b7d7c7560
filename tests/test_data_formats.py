"""Readers: every format, JSON and JSONL, files and directories; located errors for each kind of bad record."""

import json
import subprocess
import sys

import pytest

from bumblecore.data.formats import DataError, ReadReport, iter_json_records, read_samples


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


ALPACA = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be exact."}
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
TOOLS = {"conversations": [
    {"from": "human", "value": "weather?"},
    {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
    {"from": "observation", "value": "rain"},
    {"from": "gpt", "value": "It rains."},
], "tools": '[{"name": "weather", "description": "w", "parameters": {"type": "object"}}]'}
PREF_ALPACA = {"instruction": "Pick", "input": "", "chosen": "good", "rejected": "bad"}
PREF_SHAREGPT = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                 "rejected": {"from": "gpt", "value": "b"}}


def test_every_format_from_json_and_jsonl(tmp_path):
    alpaca = list(read_samples(write_json(tmp_path / "a.json", [ALPACA]), "sft"))[0]
    assert alpaca.conversation.messages == [
        {"role": "system", "content": "Be exact."}, {"role": "user", "content": "Add\n2 and 3"}, {"role": "assistant", "content": "5"}]
    tools = list(read_samples(write_jsonl(tmp_path / "t.jsonl", [TOOLS]), "sft"))[0]
    assert tools.conversation.tools == [{"type": "function", "function": {"name": "weather", "description": "w", "parameters": {"type": "object"}}}]
    assert [m["role"] for m in tools.conversation.messages] == ["user", "assistant", "tool", "assistant"]
    assert tools.conversation.messages[1]["tool_calls"] == [{"name": "weather", "arguments": {"city": "Oslo"}}]
    pref = list(read_samples(write_jsonl(tmp_path / "p.jsonl", [PREF_ALPACA]), "dpo"))[0]
    assert pref.chosen["content"] == "good" and pref.rejected["content"] == "bad"
    pref2 = list(read_samples(write_json(tmp_path / "p2.json", [PREF_SHAREGPT]), "dpo"))[0]
    assert pref2.conversation.messages == [{"role": "user", "content": "q"}] and pref2.chosen["content"] == "a"
    text = list(read_samples(write_jsonl(tmp_path / "x.jsonl", [{"text": "doc"}]), "pretrain"))[0]
    assert text.text == "doc"


def test_directory_and_several_files_and_empty_tools(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", [SHAREGPT, {**SHAREGPT, "tools": "[]"}])
    write_json(folder / "2.json", [SHAREGPT])
    samples = list(read_samples(str(folder), "sft"))
    assert len(samples) == 3 and all(s.conversation.tools is None for s in samples)
    assert samples[2].where.endswith("2.json record 1")


def test_streamed_json_array_matches_json_load(tmp_path):
    records = [{"text": "长文本 " * (i % 50) + str(i), "n": [i, {"x": "]},"}]} for i in range(300)]
    file = write_json(tmp_path / "big.json", records)
    import bumblecore.data.formats as formats

    with open(file, encoding="utf-8") as handle:
        streamed = [r for _, r in formats._iter_json_array(file, handle, chunk_size=97)]
    assert streamed == records


@pytest.mark.parametrize("records,fmt,message", [
    ([SHAREGPT, "BROKEN"], "jsonl", r"line 2: not valid JSON"),
    ([ALPACA, {"instruction": "x"}], "jsonl", r'line 2: missing field "output"'),
    ([ALPACA, {"instruction": "x", "output": "   "}], "json", r'record 2: field "output" is empty'),
    ([{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}], "jsonl",
     r'line 1: field "conversations" turn 1 has role "gpt" out of order'),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gtp", "value": "b"}]}], "jsonl",
     r'line 1: field "conversations" turn 2 has role "gtp"; expected system, human'),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]}], "json",
     r'record 1: field "conversations" turn 2 \(gpt\) is an empty assistant turn'),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}]}], "jsonl",
     r'line 1: field "conversations" must end on an assistant turn'),
    ([{**TOOLS, "tools": "[{oops"}], "jsonl", r'line 1: field "tools" is not valid JSON'),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "not json"}]}], "jsonl",
     r'turn 2 \(function_call\) is not valid JSON'),
])
def test_bad_records_name_file_place_and_field(tmp_path, records, fmt, message):
    path = tmp_path / f"bad.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    else:
        write_json(path, records)
    with pytest.raises(DataError, match=message) as info:
        list(read_samples(path, "sft"))
    assert str(path) in str(info.value)


def test_skip_bad_records_reports_where(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(ALPACA), "{broken", json.dumps({"instruction": "x"}), json.dumps(ALPACA)]) + "\n")
    report = ReadReport()
    samples = list(read_samples(path, "sft", skip_bad_records=True, report=report))
    assert len(samples) == 2 and report.records == 2
    assert len(report.skipped) == 2 and "line 2" in report.skipped[0] and "line 3" in report.skipped[1]


def test_wrong_stage_is_named(tmp_path):
    with pytest.raises(DataError, match="do not suit training_stage dpo"):
        list(read_samples(write_jsonl(tmp_path / "a.jsonl", [ALPACA]), "dpo"))


def test_cli_bad_record_exits_nonzero_without_traceback(tmp_path, tokenizer_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ALPACA) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    for command in ("inspect_data", "prepare_data"):
        result = subprocess.run([sys.executable, "-m", "bumblecore", command, "--model_name_or_path", str(tokenizer_dir),
                                 "--dataset_path", str(data), "--cache_dir", str(tmp_path / "cache")],
                                capture_output=True, text=True)
        assert result.returncode == 1
        assert f'{data} line 2: missing field "output"' in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
