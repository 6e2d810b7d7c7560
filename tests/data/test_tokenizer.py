"""train_tokenizer / load_tokenizer: round trips, specials, streaming corpus reading, and the ChatML
template of docs/DATA_FORMAT.md (expected strings written out by hand in Qwen2.5's format)."""

import itertools
import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bumblecore.tokenizer import CHAT_TEMPLATE, iter_corpus_texts, load_tokenizer, train_tokenizer

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"

ENGLISH = (
    "the a small bee model friend teacher engine reads writes learns counts trains garden flower story data "
    "token answer question morning evening river mountain city music happy quickly slowly bright green "
    "isn't it's we're they've"
).split()
CHINESE = (
    "你好 世界 训练 一个 小模型 蜜蜂 喜欢 花园 里的 花 老师 计算 数字 我们 学习 中文 英文 今天 天气 "
    "很好 明天 下雨 朋友 读书 写字 音乐 山 河 城市 快乐"
).split()
PUNCTUATION = [".", "!", "?", ",", "。", "！", "？", "，", ":", "…"]
EMOJI = ["🐝", "🚀", "🌸", "👍", "😀", "🎉", "🍵", "🌧️"]


def mixed_lines(seed: int, count: int) -> list[str]:
    """Sentences of English words, Chinese words, numbers, punctuation and emoji, reproducibly random."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        english = " ".join(rng.choices(ENGLISH, k=rng.randint(3, 8))).capitalize()
        chinese = "".join(rng.choices(CHINESE, k=rng.randint(2, 6)))
        lines.append(
            f"{english} {rng.randint(0, 99999)}{rng.choice(PUNCTUATION)} {chinese}{rng.choice(PUNCTUATION)} "
            f"{''.join(rng.choices(EMOJI, k=rng.randint(1, 3)))} ok"
        )
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer_corpus")
    (root / "mixed.txt").write_text("\n".join(mixed_lines(0, 300)) + "\n", encoding="utf-8")
    with open(root / "docs.jsonl", "w", encoding="utf-8") as handle:
        for line in mixed_lines(1, 150):
            handle.write(json.dumps({"text": line}, ensure_ascii=False) + "\n")
    return root


@pytest.fixture(scope="module")
def trained_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "tok"
    returned = train_tokenizer(
        [str(corpus / "mixed.txt"), str(corpus / "docs.jsonl")], vocab_size=800, output_dir=str(out)
    )
    assert returned == str(out)
    return out


@pytest.fixture(scope="module")
def tok(trained_dir):
    return load_tokenizer(trained_dir)


# ---------------------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    "text",
    [
        "The bee reads the data, it's 2026!",
        "你好，世界！训练一个小模型。",
        "🐝🚀 ok",
        "  two spaces\n\n\ttab, trailing  ",
        "unseen: ÅØ 👩‍👩‍👧 混合 ∑ 0123456789",
    ],
)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_training_learned_merges_for_every_script(tok):
    # Seen often in the corpus, so BPE merged them well below their UTF-8 byte counts.
    for text, utf8_bytes in [(" reads", 6), ("训练", 6), ("🐝", 4)]:
        assert len(tok.encode(text)) < utf8_bytes, text
    assert 600 < len(tok) <= 800


def test_nfc_normalisation(tok):
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


def test_pre_tokenizer_splits_like_qwen2(tok):
    pieces = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("I'm 12345 bees!!\n\n  你好 ok")
    to_byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    expected = ["I", "'m", " ", "123", "45", " bees", "!!\n\n", " ", " 你好", " ok"]
    assert [piece for piece, _ in pieces] == [to_byte_level.pre_tokenize_str(p)[0][0] for p in expected]


def test_specials_are_single_unsplit_tokens(tok):
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    for token_id, special in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
        assert tok.encode(special) == [token_id]
    ids = tok.encode("hi<|im_start|>user\n你好<|im_end|>\n<|endoftext|>ok")
    assert [ids.count(i) for i in (0, 1, 2)] == [1, 1, 1]
    assert tok.decode(ids) == "hi<|im_start|>user\n你好<|im_end|>\n<|endoftext|>ok"
    assert not {0, 1, 2} & set(tok.encode("<|im_start|"))  # an incomplete special is plain text
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token) == ("<|im_end|>", "<|endoftext|>", None, None)
    assert tok.model_max_length == 32768


def test_autotokenizer_loads_the_saved_dir(trained_dir, tok):
    auto = AutoTokenizer.from_pretrained(trained_dir)
    assert isinstance(auto, PreTrainedTokenizerFast)
    text = "The bee reads 你好 🐝<|im_end|>"
    assert auto.encode(text) == tok.encode(text)
    assert auto.chat_template == CHAT_TEMPLATE
    assert (auto.eos_token, auto.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert json.loads((trained_dir / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


# ---------------------------------------------------------------------------- chat template


def render(tok, messages, **kwargs):
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def test_chatml_inserts_the_default_system_message(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render(tok, messages) == SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"


def test_chatml_explicit_system(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    assert render(tok, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    )


def test_chatml_multi_turn_and_generation_prompt(tok):
    messages = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "蜜蜂？\n🐝"},
    ]
    body = (
        "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n蜜蜂？\n🐝<|im_end|>\n"
    )
    assert render(tok, messages) == SYSTEM + body
    assert render(tok, messages, add_generation_prompt=True) == SYSTEM + body + "<|im_start|>assistant\n"


def test_tools_calls_and_results_in_qwen25_convention(tok):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "天气",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in 北京 and Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": {"city": "北京"}}},
                {"name": "weather", "arguments": '{"city": "Paris"}'},  # already JSON: emitted as is
            ],
        },
        {"role": "tool", "content": "晴"},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "北京 is sunny, Paris rainy."},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "weather", "description": "天气", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in 北京 and Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n晴\n</tool_response>\n<tool_response>\nrain\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n北京 is sunny, Paris rainy.<|im_end|>\n"
    )
    assert render(tok, messages, tools=tools) == expected


def test_tools_with_explicit_system_and_a_call_after_text(tok):
    tools = [{"name": "add", "parameters": {"a": "int"}}, {"name": "now"}]
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "2+3, and the time"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}],
        },
        {"role": "tool", "content": "5"},
    ]
    expected = (
        "<|im_start|>system\nUse tools.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"name": "add", "parameters": {"a": "int"}}\n{"name": "now"}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n2+3, and the time<|im_end|>\n"
        '<|im_start|>assistant\nLet me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render(tok, messages, tools=tools, add_generation_prompt=True) == expected


def test_chat_template_tokenizes_specials_as_single_ids(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids.count(1) == 3 and ids.count(2) == 2
    assert tok.decode(ids) == SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------- load_tokenizer


def test_load_tokenizer_fills_in_template_and_pad(tmp_path, trained_dir):
    plain = PreTrainedTokenizerFast(tokenizer_file=str(trained_dir / "tokenizer.json"), eos_token="<|im_end|>")
    plain.save_pretrained(tmp_path / "plain")
    loaded = load_tokenizer(tmp_path / "plain")
    assert loaded.chat_template == CHAT_TEMPLATE and loaded.pad_token == "<|endoftext|>"

    other = Tokenizer(models.WordLevel({"</s>": 0, "hi": 1, "[UNK]": 2}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=other, eos_token="</s>", chat_template="{{ messages[0]['content'] }}"
    ).save_pretrained(tmp_path / "other")
    loaded = load_tokenizer(str(tmp_path / "other"))
    assert loaded.pad_token == "</s>"  # no <|endoftext|>: pad with eos
    assert loaded.chat_template == "{{ messages[0]['content'] }}"  # its own template is kept


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"model is not a tokenizer directory"):
        load_tokenizer(tmp_path / "model")


# ---------------------------------------------------------------------------- corpus and command


def test_corpus_records_of_every_format_give_their_strings(tmp_path):
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Add", "input": "", "output": "5"}) + "\n\n", encoding="utf-8")
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(
        json.dumps(
            {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "🐝"}]}, ensure_ascii=False
        )
        + "\n",
        encoding="utf-8",
    )
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "one", "n": 3}, {"text": "two"}]), encoding="utf-8")
    plain = tmp_path / "plain.txt"
    plain.write_text("line 1\nline 2", encoding="utf-8")
    assert list(iter_corpus_texts([alpaca, sharegpt, array, plain])) == [
        "Add",
        "5",
        "human",
        "你好",
        "gpt",
        "🐝",
        "one",
        "two",
        "line 1\n",
        "line 2",
    ]


def test_corpus_is_read_lazily(tmp_path):
    data = tmp_path / "big.jsonl"
    data.write_text('{"text": "first"}\n{"text": "second"}\n{"text": broken\n', encoding="utf-8")
    texts = iter_corpus_texts([data])
    assert list(itertools.islice(texts, 2)) == ["first", "second"]  # yielded before line 3 is parsed
    with pytest.raises(ValueError, match="big.jsonl line 3: not valid JSON"):
        next(texts)


def test_train_tokenizer_command(tmp_path, corpus, capsys):
    from bumblecore.cli import load_command, main

    assert load_command("train_tokenizer") is train_tokenizer
    out = tmp_path / "cli_tok"
    main(
        [
            "train_tokenizer",
            "--corpus",
            str(corpus),
            "--vocab_size",
            "400",
            "--output_dir",
            str(out),
            "--min_frequency",
            "3",
        ]
    )
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "400 tokens" in summary[0] and "2 file(s)" in summary[0] and str(out) in summary[0]
    cli_tok = AutoTokenizer.from_pretrained(out)
    assert len(cli_tok) == 400 and cli_tok.decode(cli_tok.encode("蜜蜂 reads 🐝")) == "蜜蜂 reads 🐝"

    with pytest.raises(SystemExit) as exit_info:
        main(["train_tokenizer", "--corpus", str(corpus), "--vocab_size", "100", "--output_dir", str(tmp_path / "x")])
    assert exit_info.value.code == 1
    assert "bumblecore train_tokenizer: error: vocab_size 100 is too small" in capsys.readouterr().err


def test_bad_inputs_are_clear_errors(tmp_path, corpus):
    out = str(tmp_path / "t")
    with pytest.raises(ValueError, match="vocab_size 258 is too small.*need 259"):
        train_tokenizer([str(corpus / "mixed.txt")], vocab_size=258, output_dir=out)
    with pytest.raises(FileNotFoundError, match=r"corpus file .*missing\.txt does not exist"):
        train_tokenizer([str(corpus / "mixed.txt"), str(tmp_path / "missing.txt")], vocab_size=300, output_dir=out)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir holds no .txt, .jsonl or .json files"):
        train_tokenizer([str(tmp_path / "empty_dir")], vocab_size=300, output_dir=out)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="blank.jsonl holds no text"):
        train_tokenizer([str(tmp_path / "blank.jsonl")], vocab_size=300, output_dir=out)
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8 text"):
        train_tokenizer([str(tmp_path / "latin1.txt")], vocab_size=300, output_dir=out)
    with pytest.raises(ValueError, match="corpus is empty"):
        train_tokenizer([], vocab_size=300, output_dir=out)
