"""The tokenizer's own special tokens (docs/DATA_FORMAT.md): raw text (pretraining documents, raw-text
prompts) carries exactly what transformers' `tokenizer(text)` puts around it, never twice, and a chat
render starts with the tokenizer's BOS exactly once. Tokenizers built here, no downloads: Llama-3 style
(a TemplateProcessing post-processor), Gemma style (GemmaTokenizer, add_bos_token), Llama-2/Mistral
style (LlamaTokenizer, sentencepiece-like) without a template (so ChatML), one that adds BOS and EOS,
and ours (adds nothing). Oracles: `tokenizer(text)` and `apply_chat_template(..., tokenize=True)`."""

import json

import pytest
import torch
import yaml
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GemmaTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizer, PreTrainedTokenizerFast

from bumblecore.args import DataArgs
from bumblecore.chat.format import (
    chat_format,
    encode_conversation,
    encode_document,
    encode_preference,
    end_of_text_id,
    render_prompt,
    special_tokens_added,
)
from bumblecore.cli import main
from bumblecore.data.cache import cache_key
from bumblecore.data.dataset import dataset_units
from bumblecore.inference.commands import build_prompt_ids
from bumblecore.inference.sampling import SamplingArgs
from bumblecore.recipes import recipe_for
from bumblecore.tokenizer import SPLIT_PATTERN, load_tokenizer

CORPUS = [
    "The bee reads the data.",
    "A small model trains on 42 tokens.",
    "The capital of France is Paris.",
    "hello world, the brave fox jumps",
    "花园里的花。",
] * 4

# Llama-3's published format: the BOS once, then per message a role header and the trimmed content
# closed by <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] | trim) + '<|eot_id|>' -%}"
    "{%- if loop.index0 == 0 -%}{%- set content = bos_token + content -%}{%- endif -%}"
    "{{- content -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Gemma's published format: the BOS, turns of user and model (the assistant), no system role.
GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' + (message['content'] | trim) + '<end_of_turn>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)
CHATML_MARKERS = ["<|im_start|>", "<|im_end|>"]


def byte_level_bpe(specials: list[str]) -> Tokenizer:
    """A small byte-level BPE (GPT-4-style split, as Llama-3's) with these special tokens."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return backend


def character_vocab(specials: list[str]) -> dict:
    """A sentencepiece-like vocabulary: the special tokens, "▁", the corpus' characters, byte fallbacks."""
    vocab = {token: i for i, token in enumerate(specials)}
    for piece in ["▁"] + sorted(set("".join(CORPUS))) + [f"<0x{b:02X}>" for b in range(256)]:
        vocab.setdefault(piece, len(vocab))
    return vocab


def build_llama3(out):
    backend = byte_level_bpe(LLAMA3_TOKENS)
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        chat_template=LLAMA3_TEMPLATE,
    ).save_pretrained(str(out))


def build_gemma(out):
    tok = GemmaTokenizer(
        vocab=character_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]),
        merges=[],
        add_bos_token=True,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_TEMPLATE
    tok.save_pretrained(str(out))


def build_mistral(out):
    """Llama-2 / Mistral style (add_bos_token, "▁" pieces) with no template of its own: ours (ChatML)."""
    tok = LlamaTokenizer(
        vocab=character_vocab(["<unk>", "<s>", "</s>"] + CHATML_MARKERS), merges=[], add_bos_token=True
    )
    tok.add_special_tokens({"additional_special_tokens": CHATML_MARKERS})
    tok.save_pretrained(str(out))


def build_bos_and_eos(out):
    backend = byte_level_bpe(["<s>", "</s>"] + CHATML_MARKERS)
    PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=True,
        additional_special_tokens=CHATML_MARKERS,
    ).save_pretrained(str(out))


BUILDERS = {"llama3": build_llama3, "gemma": build_gemma, "mistral": build_mistral, "bos_eos": build_bos_and_eos}
KINDS = ["llama3", "gemma", "mistral", "bos_eos", "ours"]
BOS = {"llama3": "<|begin_of_text|>", "gemma": "<bos>", "mistral": "<s>", "bos_eos": "<s>", "ours": None}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, tokenizer_dir):
    dirs = {"ours": tokenizer_dir}
    for kind, build in BUILDERS.items():
        dirs[kind] = tmp_path_factory.mktemp(kind)
        build(dirs[kind])
    return dirs


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dirs):
    return {kind: load_tokenizer(path) for kind, path in tokenizer_dirs.items()}


def bos_id(tok, kind):
    return tok.convert_tokens_to_ids(BOS[kind]) if BOS[kind] else None


def test_what_each_tokenizer_adds(tokenizers):
    """The test tokenizers are what they stand for (transformers' own view of them)."""
    for kind, tok in tokenizers.items():
        ids = tok("hello")["input_ids"]
        assert (ids[0] == bos_id(tok, kind)) == (kind != "ours"), kind
        assert (ids[-1] == tok.eos_token_id) == (kind == "bos_eos"), kind
        before, after = special_tokens_added(tok)
        assert before == ([] if kind == "ours" else [bos_id(tok, kind)])
        assert after == ([tok.eos_token_id] if kind == "bos_eos" else [])
    assert tokenizers["llama3"].chat_template == LLAMA3_TEMPLATE and tokenizers["gemma"].chat_template == GEMMA_TEMPLATE
    assert chat_format(tokenizers["mistral"]).is_chatml and chat_format(tokenizers["bos_eos"]).is_chatml


TEXTS = ["The bee reads the data.", " hello world", "花园里的花。", ""]


@pytest.mark.parametrize("kind", KINDS)
def test_documents_carry_what_the_tokenizer_adds_and_end_once(tokenizers, kind):
    tok = tokenizers[kind]
    eot = end_of_text_id(tok)
    for text in TEXTS:
        expected = tok(text)["input_ids"]  # transformers' own: its BOS (and EOS) around the text
        if kind != "bos_eos":  # a tokenizer that appends its EOS has ended the document itself
            expected = expected + [eot]
        assert encode_document(tok, text) == expected, (kind, text)
    if BOS[kind]:
        # A text that starts with the BOS string already has its BOS: never a second one.
        assert encode_document(tok, BOS[kind] + TEXTS[0]) == encode_document(tok, TEXTS[0])
    # A text that already ends with the end-of-text token is not ended twice.
    ended = TEXTS[0] + tok.convert_ids_to_tokens(eot)
    assert encode_document(tok, ended) == encode_document(tok, TEXTS[0])


@pytest.mark.parametrize("kind", KINDS)
def test_raw_prompts_start_as_documents_do(tokenizers, kind):
    """generate/chat/serve with --training_stage pretrain: the tokenizer's BOS and the text; never its
    EOS (the model would start a new document); special-token strings typed in it stay text."""
    tok = tokenizers[kind]
    _, after = special_tokens_added(tok)
    for text in TEXTS[:3]:
        expected = tok(text)["input_ids"]
        expected = expected[: len(expected) - len(after)]
        assert build_prompt_ids(tok, text, "pretrain") == expected, (kind, text)
        assert build_prompt_ids(tok, text, "continue_pretrain") == expected
    if BOS[kind]:
        assert build_prompt_ids(tok, BOS[kind] + TEXTS[0], "pretrain") == build_prompt_ids(tok, TEXTS[0], "pretrain")
        typed = build_prompt_ids(tok, "The " + BOS[kind] + " bee", "pretrain")
        assert typed.count(bos_id(tok, kind)) == 1 and typed[0] == bos_id(tok, kind)  # only the tokenizer's


CONVERSATION = [
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "The bee?"},
    {"role": "assistant", "content": " reads the data. "},
]
END_OF_TURN = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "<|im_end|>", "bos_eos": "<|im_end|>"}
END_OF_TURN["ours"] = "<|im_end|>"


def trained_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


@pytest.mark.parametrize("kind", KINDS)
def test_a_chat_render_starts_with_the_bos_exactly_once(tokenizers, kind):
    """The model's own template (writing bos_token): transformers' ids exactly. ChatML on a tokenizer that
    adds a BOS: that BOS once, then transformers' ids. Ours: transformers' ids, no BOS. The BOS is never
    a target, and the targets are what they were."""
    tok = tokenizers[kind]
    writes_bos = kind in ("llama3", "gemma")
    lead = [] if kind == "ours" or writes_bos else [bos_id(tok, kind)]

    def oracle(messages, **options):
        return lead + tok.apply_chat_template(messages, tokenize=True, return_dict=False, **options)

    ids, mask = encode_conversation(tok, CONVERSATION)
    assert ids == oracle(CONVERSATION)
    if BOS[kind]:
        assert ids[0] == bos_id(tok, kind) and ids.count(bos_id(tok, kind)) == 1 and not mask[0]
    eot = END_OF_TURN[kind]
    expected_targets = f"2{eot}reads the data.{eot}" if writes_bos else f"2{eot} reads the data. {eot}"
    assert trained_text(tok, ids, mask) == expected_targets
    assert render_prompt(tok, CONVERSATION[:1]) == oracle(CONVERSATION[:1], add_generation_prompt=True)
    reply = {"role": "assistant", "content": "a bee"}
    ids, mask = encode_preference(tok, CONVERSATION[:3], reply)
    assert ids == oracle(CONVERSATION[:3] + [reply]) and trained_text(tok, ids, mask) == f"a bee{eot}"


@pytest.mark.parametrize("kind", ["llama3", "mistral"])
def test_the_bos_string_in_a_message_stays_text(tokenizers, kind):
    """Escaping of special strings in message text is intact: a BOS typed at the start of the first
    message does not stand in for the render's BOS, nor add a second one."""
    tok = tokenizers[kind]
    messages = [{"role": "user", "content": BOS[kind] + "hi"}, {"role": "assistant", "content": BOS[kind] + "yo"}]
    ids, mask = encode_conversation(tok, messages)
    assert ids[0] == bos_id(tok, kind) and ids.count(bos_id(tok, kind)) == 1
    assert trained_text(tok, ids, mask).startswith(BOS[kind] + "yo")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["llama3", "bos_eos", "ours"])
def test_documents_through_the_cache_packing_and_inspect_data(tmp_path, tokenizers, tokenizer_dirs, capsys, kind):
    """prepare_data's path (the token cache, then pretraining blocks) and inspect_data's JSON and text
    views hold the tokenizer's own tokens, as transformers gives them."""
    tok = tokenizers[kind]
    documents = [{"text": t} for t in TEXTS[:3]]
    data = write_jsonl(tmp_path / "docs.jsonl", documents)
    expected = [encode_document(tok, d["text"]) for d in documents]
    for ids, document in zip(expected, documents):  # the oracle, once more: transformers' own ids
        assert ids[: len(tok(document["text"])["input_ids"])] == tok(document["text"])["input_ids"]

    args = DataArgs(dataset_path=str(data), cutoff_len=16, packing=True, cache_dir=str(tmp_path / "cache"))
    cache, units = dataset_units(args, recipe_for("continue_pretrain").reading, 0, tok, str(data), progress=False)
    assert [cache.sample(i)[0].tolist() for i in range(len(cache))] == expected
    stream = [int(t) for row in units.rows for piece in row for t in cache.ids[piece.start : piece.end]]
    assert stream == [t for ids in expected for t in ids]  # the blocks cut that stream, BOS and all

    run = {
        "training_stage": "continue_pretrain",
        "model_name_or_path": str(tokenizer_dirs[kind]),
        "dataset_path": str(data),
        "cutoff_len": 64,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    capsys.readouterr()
    main(["inspect_data", "--config", str(tmp_path / "run.yaml"), "--num_samples", "3", "--format", "json"])
    shown = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [s["input_ids"] for s in shown] == expected and [s["labels"] for s in shown] == expected
    main(["inspect_data", "--config", str(tmp_path / "run.yaml"), "--num_samples", "1"])
    text = capsys.readouterr().out
    lead = (BOS[kind] or "") + TEXTS[0]
    assert "[[" + lead in text  # the BOS shown, trained like every document token


def test_inspect_data_shows_the_bos_of_a_chat_render(tmp_path, tokenizer_dirs, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "The bee?", "output": "reads the data."}])
    for kind in ("mistral", "llama3"):
        main(["inspect_data", "--model_name_or_path", str(tokenizer_dirs[kind]), "--dataset_path", str(data)])
        shown = capsys.readouterr().out.split("=====\n", 1)[1]
        assert shown.startswith(BOS[kind]) and shown.count(BOS[kind]) == 1, shown
        main(
            ["inspect_data", "--model_name_or_path", str(tokenizer_dirs[kind]), "--dataset_path", str(data)]
            + ["--format", "json"]
        )
        sample = json.loads(capsys.readouterr().out)
        assert sample["input_ids"][0] == load_tokenizer(tokenizer_dirs[kind]).convert_tokens_to_ids(BOS[kind])
        assert sample["labels"][0] == -100


def test_the_cache_key_follows_the_added_tokens(tmp_path, tokenizer_dirs):
    """The same vocabulary and template with and without the BOS the tokenizer adds: different tokens,
    different keys, for documents and for conversations."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    with_bos = load_tokenizer(tokenizer_dirs["gemma"])
    without = load_tokenizer(tokenizer_dirs["gemma"])
    without.add_bos_token = False
    assert without("x")["input_ids"] == with_bos("x", add_special_tokens=False)["input_ids"]
    for stage in ("pretrain", "continue_pretrain", "sft", "dpo"):
        reading = recipe_for(stage).reading
        assert cache_key(data, with_bos, reading, 64, False) != cache_key(data, without, reading, 64, False), stage
        assert cache_key(data, with_bos, reading, 64, False) == cache_key(
            data, load_tokenizer(tokenizer_dirs["gemma"]), reading, 64, False
        )
    assert chat_format(with_bos).fingerprint != chat_format(without).fingerprint


def tiny_llama(directory, tok):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return model


def test_generate_and_the_server_prompt_a_base_model_as_transformers_does(tmp_path, tokenizers, capsys):
    """`generate --training_stage pretrain` on a tokenizer that adds a BOS prints transformers' greedy
    continuation of `tokenizer(prompt)`, and the server's raw-text prompt is those same ids."""
    from bumblecore.inference.commands import generate
    from bumblecore.inference.openai_request import parse_chat_request
    from bumblecore.inference.serve_settings import ServeSettings
    from bumblecore.inference.serving_http import ChatCompletionsSpec

    tok = tokenizers["llama3"]
    model = tiny_llama(tmp_path, tok)
    text = "The capital of France is"
    prompt = tok(text, return_tensors="pt")["input_ids"]
    assert prompt[0, 0].item() == tok.bos_token_id
    expected = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, eos_token_id=None
    )
    capsys.readouterr()
    sampling = SamplingArgs(max_new_tokens=8, do_sample=False)
    generate(
        str(tmp_path), prompt=text, training_stage="pretrain", sampling=sampling, ignore_eos=True, device_map="cpu"
    )
    assert capsys.readouterr().out == tok.decode(expected[0, prompt.shape[1] :]) + "\n"

    spec = ChatCompletionsSpec(ServeSettings(str(tmp_path), training_stage="pretrain"))
    spec.tokenizer = load_tokenizer(tmp_path)
    chat = parse_chat_request({"messages": [{"role": "user", "content": text}]})
    assert spec.prompt_ids(chat) == prompt[0].tolist()
