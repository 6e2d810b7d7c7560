"""Chat templates by name, new special tokens and a grown vocabulary (issue 28, point 3).

Oracles: the trained text of each built-in is what its published format says an assistant turn is
(content + end-of-turn token), written out here by hand; grown embedding rows are the closed-form
mean of the old rows, and old tokens' logits equal transformers' on the unchanged model; a LoRA
adapter with new tokens gives peft's own logits (PeftModel.from_pretrained on a base grown by
transformers' resize_token_embeddings); the server's errors come through the `openai` client.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from bumblecore.chat.format import ChatFormatError, chat_format
from bumblecore.chat.templates import BUILT_IN, MARKERS, parse_special_tokens, prepare_tokenizer
from bumblecore.cli import main
from bumblecore.recipes import recipe_for
from bumblecore.tokenizer import load_tokenizer

DEMO = Path(__file__).resolve().parents[2] / "bumblecore" / "demo_data"
CORPUS = ["hello world how are you", "the weather is fine today", "Be brief. ping pong count words"] * 20

# Each family's tokenizer conventions (bos, eos) beside the markers its template writes.
FAMILIES = {
    "chatml": (None, "<|endoftext|>"),
    "qwen2.5": (None, "<|endoftext|>"),
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>"),
    "mistral": ("<s>", "</s>"),
    "gemma": ("<bos>", "<eos>"),
    "phi3": ("<s>", "<|endoftext|>"),
}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "world today"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine"},
]
# What each published format trains: every assistant reply and the token that closes it.
TRAINED = {
    "chatml": "world today<|im_end|>fine<|im_end|>",
    "qwen2.5": "world today<|im_end|>fine<|im_end|>",
    "llama3": "world today<|eot_id|>fine<|eot_id|>",
    "mistral": " world today</s> fine</s>",
    "gemma": "world today<end_of_turn>fine<end_of_turn>",
    "phi3": "world today<|end|>fine<|end|>",
}
RENDERED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    "world today<|im_end|>\n<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\nfine<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
    "<|end_header_id|>\n\nhello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nworld today<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nhow are you<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    "\n\nfine<|eot_id|>",
    "mistral": "<s>[INST] Be brief.\n\nhello [/INST] world today</s>[INST] how are you [/INST] fine</s>",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nhello<end_of_turn>\n<start_of_turn>model\nworld today<end_of_turn>\n"
    "<start_of_turn>user\nhow are you<end_of_turn>\n<start_of_turn>model\nfine<end_of_turn>\n",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nhello<|end|>\n<|assistant|>\nworld today<|end|>\n<|user|>\n"
    "how are you<|end|>\n<|assistant|>\nfine<|end|>\n",
}


def build_tokenizer(special: list[str], bos=None, eos=None, out=None):
    """A byte-level BPE of ~400 tokens with `special` as special tokens and no chat template (a base
    model's tokenizer); saved to `out` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, clean_up_tokenization_spaces=False
    )
    if out is not None:
        tokenizer.save_pretrained(str(out))
    return tokenizer


def loaded_size(model_dir: Path, config_class) -> int:
    """len() of the tokenizer in model_dir as loaded beside a config.json of that family (transformers
    picks the family's tokenizer class, which may add tokens: Qwen2's adds <|endoftext|>)."""
    config_class().save_pretrained(model_dir)
    return len(load_tokenizer(model_dir))


def family_tokenizer(name: str):
    bos, eos = FAMILIES[name]
    return build_tokenizer([t for t in (bos, eos) if t] + MARKERS[name], bos, eos)


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_each_built_in_trains_its_replies_and_their_end_of_turn_token(name):
    tokenizer = family_tokenizer(name)
    prepare_tokenizer(tokenizer, name)
    chat = chat_format(tokenizer)
    chat.check_trainable(name)
    ids, mask = chat.encode(CONVERSATION)
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == TRAINED[name]
    if name in RENDERED:
        assert tokenizer.decode(ids) == RENDERED[name]
    # every marker is one special token (never text pieces), and the end of a turn is the eos now
    for marker in MARKERS[name]:
        assert tokenizer.convert_tokens_to_ids(marker) in ids
    end = chat.end_of_turn[0]
    assert end == TRAINED[name][-len(end) :] and tokenizer.eos_token == end
    # the prompt for the last reply is a prefix of the whole conversation (what inference feeds), and
    # what follows it is that reply and its end-of-turn token
    prompt = chat.prompt_ids(CONVERSATION[:-1])
    assert ids[: len(prompt)] == prompt
    assert tokenizer.decode(ids[len(prompt) :]).strip() == TRAINED[name].split(end)[-2].strip() + end


def test_qwen25_has_its_default_system_message_and_both_chatml_forms_render_tools():
    tokenizer = family_tokenizer("qwen2.5")
    prepare_tokenizer(tokenizer, "qwen2.5")
    text = tokenizer.decode(chat_format(tokenizer).prompt_ids([{"role": "user", "content": "hello"}]))
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    tool = {"name": "count_words", "description": "Count", "parameters": {"type": "object", "properties": {}}}
    for name in ("chatml", "qwen2.5"):
        prepare_tokenizer(tokenizer, name)
        assert "<tools>" in tokenizer.decode(
            chat_format(tokenizer).prompt_ids([{"role": "user", "content": "hi"}], [tool])
        )


@pytest.mark.parametrize("name", ["llama3", "mistral", "gemma", "phi3"])
def test_templates_without_tools_refuse_them(name):
    tokenizer = family_tokenizer(name)
    prepare_tokenizer(tokenizer, name)
    with pytest.raises(ChatFormatError, match="chat_template: chatml or qwen2.5"):
        chat_format(tokenizer).encode(CONVERSATION[1:3], tools=[{"name": "f", "parameters": {}}])


@pytest.mark.parametrize("name", ["mistral", "gemma"])
def test_a_role_order_the_template_refuses_is_a_chat_format_error(name):
    tokenizer = family_tokenizer(name)
    prepare_tokenizer(tokenizer, name)
    with pytest.raises(ChatFormatError, match="alternate"):
        chat_format(tokenizer).encode([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}])


def test_the_token_cache_key_follows_the_template_and_inference_refuses_missing_markers():
    from bumblecore.chat.templates import use_chat_template
    from bumblecore.data.cache import cache_key

    tokenizer = family_tokenizer("chatml")
    data = DEMO / "sft_eval.jsonl"
    keys = set()
    for name in ("chatml", "qwen2.5"):
        prepare_tokenizer(tokenizer, name)
        keys.add(cache_key([str(data)], tokenizer, recipe_for("sft").reading, 64, False))
    assert len(keys) == 2
    with pytest.raises(ValueError, match="chat_template llama3: the model's tokenizer has no <.start_header_id"):
        use_chat_template(tokenizer, "llama3")


def test_a_jinja_file_and_unknown_names(tmp_path):
    file = tmp_path / "mine.jinja"
    file.write_text(BUILT_IN["phi3"], encoding="utf-8")
    tokenizer = family_tokenizer("phi3")
    prepare_tokenizer(tokenizer, str(file))
    assert tokenizer.chat_template == BUILT_IN["phi3"]
    with pytest.raises(ValueError, match="chat_template 'vicuna' is not one of chatml, qwen2.5"):
        prepare_tokenizer(tokenizer, "vicuna")
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        prepare_tokenizer(tokenizer, str(tmp_path / "missing.jinja"))


def test_missing_markers_are_refused_naming_the_keys_and_added_with_resize_vocab(tmp_path):
    assert parse_special_tokens("<a>, <b>,<a>") == ["<a>", "<b>"] == parse_special_tokens(["<a>,<b>"])
    assert parse_special_tokens(["<c>", "<d>"]) == ["<c>", "<d>"]
    save_to = tmp_path / "base"
    base = build_tokenizer(["<|begin_of_text|>", "<|end_of_text|>"], "<|begin_of_text|>", "<|end_of_text|>", save_to)
    with pytest.raises(ValueError, match="resize_vocab: true"):
        prepare_tokenizer(base, "llama3", source="base")
    size = len(base)
    added = prepare_tokenizer(base, "llama3", new_special_tokens="<think>", resize_vocab=True)
    assert added == ["<think>", *MARKERS["llama3"]] and len(base) == size + 4
    ids, mask = chat_format(base).encode(CONVERSATION)
    assert base.decode([i for i, m in zip(ids, mask) if m]) == TRAINED["llama3"]
    assert base.eos_token == "<|eot_id|>"
    # ChatML, chosen or the default of a tokenizer without a template, gets <|im_start|>/<|im_end|>
    for chosen in ("chatml", None):
        plain = load_tokenizer(save_to)
        assert prepare_tokenizer(plain, chosen, resize_vocab=True) == MARKERS["chatml"]
        assert chat_format(plain).end_of_turn == ["<|im_end|>"] and plain.eos_token == "<|im_end|>"
    # a marker typed in a message stays text: only the template's own are special tokens
    ids, _ = chat_format(base).encode(
        [{"role": "user", "content": "<|eot_id|>"}, {"role": "assistant", "content": "x"}]
    )
    assert ids.count(base.convert_tokens_to_ids("<|eot_id|>")) == 2


def test_grown_rows_are_the_mean_and_old_logits_stay_transformers(tmp_path, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    from bumblecore.model.transformers_family import load_model
    from bumblecore.model.vocab import grow_vocab

    base = tiny_checkpoint(tmp_path / "base")
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    probe = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(probe).logits
    old_rows = reference.get_input_embeddings().weight.detach().clone()
    for untied in (False, True):
        ours = load_model(base, "float32")
        if untied:  # an untied head of its own values
            ours.config.tie_word_embeddings = False
            ours.lm_head.weight = torch.nn.Parameter(ours.lm_head.weight.detach().clone() * 0.5)
            old_head = ours.lm_head.weight.detach().clone()
        old = grow_vocab(ours, old_rows.shape[0] + 3)
        assert old == old_rows.shape[0] and ours.config.vocab_size == old + 3
        embed = ours.model.embed_tokens.weight
        assert torch.equal(embed[:old], old_rows)
        assert torch.allclose(embed[old:], old_rows.mean(0).expand(3, -1), atol=1e-7)
        if untied:
            assert torch.allclose(ours.lm_head.weight[old:], old_head.mean(0).expand(3, -1), atol=1e-7)
        else:
            assert ours.lm_head.weight is embed
            with torch.no_grad():
                got = ours(probe)
            assert (got[..., :old] - expected).abs().max() < 1e-4
    # transformers' own model grows the same way (the transformers-family path)
    grow_vocab(reference, old_rows.shape[0] + 3)
    assert torch.allclose(reference.get_input_embeddings().weight[-3:], old_rows.mean(0).expand(3, -1), atol=1e-7)


# ---------------------------------------------------------------------------- training from a base


@pytest.fixture(scope="module")
def base_without_template(tmp_path_factory):
    """A base model whose tokenizer has Llama-3's bos/eos but no chat template and none of its markers,
    and a tiny Qwen2 (transformers) with exactly that many rows."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("templates")
    base = root / "base"
    build_tokenizer(["<|begin_of_text|>", "<|end_of_text|>"], "<|begin_of_text|>", "<|end_of_text|>", base)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=loaded_size(base, Qwen2Config),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(base)
    data = root / "sft.jsonl"
    records = [
        {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world today"}]},
        {"conversations": [{"from": "human", "value": "how are you"}, {"from": "gpt", "value": "fine"}]},
    ] * 8
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root, base, data


def sft_config(root: Path, base: Path, data: Path, **keys) -> Path:
    config = root / f"run_{len(list(root.glob('run_*.yaml')))}.yaml"
    values = {
        "training_stage": "sft",
        "model_name_or_path": str(base),
        "dataset_path": str(data),
        "cutoff_len": 64,
        "max_steps": 3,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_model_precision": "fp32",
        "accelerator": "cpu",
        "save_steps": 100,
        "cache_dir": str(root / "cache"),
        **keys,
    }
    config.write_text(yaml.safe_dump(values), encoding="utf-8")
    return config


def test_sft_from_a_template_less_base_refuses_then_trains_with_new_tokens(base_without_template, monkeypatch, capsys):
    monkeypatch.setenv("BUMBLECORE_DEBUG", "1")  # the error itself, not the CLI's one line
    root, base, data = base_without_template
    refused = sft_config(root, base, data)
    with pytest.raises(ValueError, match="chat_template: chatml with resize_vocab: true"):
        main(["train", "--config", str(refused), "--output_dir", str(root / "refused")])
    out = root / "full"
    main(["train", "--config", str(sft_config(root, base, data, chat_template="llama3", resize_vocab=True)),
          "--output_dir", str(out)])  # fmt: skip
    saved = load_tokenizer(out)
    rows = len(load_tokenizer(base))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(saved) == rows + 3
    assert saved.chat_template == BUILT_IN["llama3"] and saved.eos_token == "<|eot_id|>"
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert eos == [saved.convert_tokens_to_ids("<|end_of_text|>"), saved.convert_tokens_to_ids("<|eot_id|>")]
    # transformers loads the grown model; the new rows trained away from their mean start
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == rows + 3
    # generate uses the template the model was trained with; naming it changes nothing, another one does
    replies, _ = [], capsys.readouterr()
    for chosen in ([], ["--chat_template", "llama3"], ["--chat_template", "mistral"]):
        main(["generate", "--model_path", str(out), "--prompt", "hello", "--max_new_tokens", "4", *chosen])
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] != replies[2]


def test_lora_with_new_tokens_loads_in_peft_merge_lora_and_generate(base_without_template):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bumblecore.inference.loading import load_for_inference

    root, base, data = base_without_template
    out = root / "lora"
    config = sft_config(root, base, data, chat_template="llama3", resize_vocab=True, finetuning_type="lora",
                        lora_rank=4, lora_alpha=8, lora_dropout=0.0)  # fmt: skip
    main(["train", "--config", str(config), "--output_dir", str(out)])
    tokenizer = load_tokenizer(out)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in MARKERS["llama3"]]
    assert sorted(adapter_config["trainable_token_indices"]["embed_tokens"]) == sorted(new_ids)

    # peft's own loading on a base that transformers grew to the tokenizer
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows = len(load_tokenizer(base))
    reference.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    reference = PeftModel.from_pretrained(reference, str(out)).eval()
    prompt = chat_format(tokenizer).prompt_ids([{"role": "user", "content": "hello"}])
    probe = torch.tensor([prompt + new_ids])
    with torch.no_grad():
        expected = reference(probe).logits
        trained_rows = reference.get_input_embeddings()(torch.tensor(new_ids))
    base_rows = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).get_input_embeddings().weight
    assert (trained_rows - base_rows.mean(0)).abs().max() > 1e-3  # the new rows were trained

    model, loaded, eos = load_for_inference(str(out), "float32", "cpu")
    assert loaded.convert_tokens_to_ids("<|eot_id|>") in eos
    with torch.no_grad():
        assert (model(probe) - expected).abs().max() < 1e-4

    merged = root / "merged"
    main(["merge_lora", "--base_model_path", str(base), "--lora_model_path", str(out), "--save_path", str(merged)])
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == rows + 3
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(probe).logits
    assert (got - expected).abs().max() < 1e-4


def test_tool_data_on_a_template_without_tools_works_by_choosing_chatml(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BUMBLECORE_DEBUG", "1")
    base = tmp_path / "gemma_base"
    tokenizer = build_tokenizer(["<bos>", "<eos>", *MARKERS["gemma"], "<|im_start|>", "<|im_end|>"], "<bos>", "<eos>")
    tokenizer.chat_template = BUILT_IN["gemma"]
    tokenizer.save_pretrained(str(base))
    (base / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": len(tokenizer)}))
    config = tmp_path / "tools.yaml"
    values = {
        "model_name_or_path": str(base),
        "dataset_path": str(DEMO / "sft_toolcall.jsonl"),
        "cache_dir": str(tmp_path),
    }
    config.write_text(yaml.safe_dump(values))
    with pytest.raises(Exception, match="chat_template: chatml or qwen2.5"):
        main(["inspect_data", "--config", str(config), "--num_samples", "1"])
    main(["inspect_data", "--config", str(config), "--num_samples", "1", "--chat_template", "qwen2.5"])
    shown = capsys.readouterr().out
    assert "<tools>" in shown and "[[<tool_call>" in shown and "You are Qwen" in shown


# ---------------------------------------------------------------------------- serving


@pytest.mark.slow
def test_server_answers_400_for_conversations_the_template_cannot_render(base_without_template):
    """The LoRA output of a llama3 run (new tokens) served as it is, then with chat_template: mistral; a
    request with tools (neither renders them) or a role order mistral refuses is a 400 naming the field,
    and the next request is answered."""
    openai = pytest.importorskip("openai")
    from serving import running_server

    from bumblecore.inference.generate import GenerationEngine, SamplingParams
    from bumblecore.inference.loading import load_for_inference

    root, _, _ = base_without_template
    adapter = root / "lora"
    if not (adapter / "adapter_config.json").is_file():
        pytest.skip("needs the LoRA run of test_lora_with_new_tokens_loads_in_peft_merge_lora_and_generate")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    hello = [{"role": "user", "content": "hello"}]
    for template, bad_order in ((None, None), ("mistral", [{"role": "assistant", "content": "hi"}, *hello])):
        options = {"chat_template": template} if template else {}
        with running_server(str(adapter), max_batch_size=2, max_model_len=128, **options) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            with pytest.raises(openai.BadRequestError) as raised:
                client.chat.completions.create(model="bumblebee", messages=hello, tools=tools, max_tokens=4)
            assert raised.value.status_code == 400 and raised.value.body["param"] == "tools"
            assert "chat_template: chatml or qwen2.5" in raised.value.body["message"]
            if bad_order:
                with pytest.raises(openai.BadRequestError) as raised:
                    client.chat.completions.create(model="bumblebee", messages=bad_order, max_tokens=4)
                assert raised.value.body["param"] == "messages" and "alternate" in raised.value.body["message"]
            reply = client.chat.completions.create(model="bumblebee", messages=hello, max_tokens=6, temperature=0)
        # the same reply as the engine gives on the same model and template, stopping on <|eot_id|> or length
        model, tokenizer, eos = load_for_inference(str(adapter), "float32", "cpu", chat_template=template)
        engine = GenerationEngine(model, tokenizer, max_batch_size=1, max_len=128, eos_token_ids=eos)
        prompt = chat_format(tokenizer).prompt_ids(hello)
        expected = engine.generate([prompt], SamplingParams(max_new_tokens=6))[0]["text"]
        assert reply.choices[0].message.content == expected


@pytest.mark.slow
def test_resize_vocab_under_zero3_equals_one_process(base_without_template):
    """2 CPU ranks under the shipped ZeRO-3 config (the grown model built partitioned, the checkpoint's
    rows scattered into it) end with one process's weights, saved at the new size."""
    from safetensors.torch import load_file
    from tiny import train_on_two_processes

    root, base, data = base_without_template
    config = sft_config(root, base, data, chat_template="llama3", resize_vocab=True, max_steps=2, learning_rate=1e-3)
    one, zero3 = root / "full_one", root / "full_zero3"
    main(["train", "--config", str(config), "--output_dir", str(one), "--gradient_accumulation_steps", "2"])
    zero_config = str(Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "ds_z3_config.json")
    train_on_two_processes(config, zero3, "--deepspeed_config_path", zero_config, cwd=root)
    expected, got = load_file(one / "model.safetensors"), load_file(zero3 / "model.safetensors")
    assert sorted(expected) == sorted(got)
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) < 1e-4
    rows = len(load_tokenizer(base)) + 3
    assert json.loads((zero3 / "config.json").read_text())["vocab_size"] == rows
    assert got["model.embed_tokens.weight"].shape[0] == rows


@pytest.mark.slow
def test_lora_with_new_tokens_under_zero3_equals_one_process(base_without_template):
    """LoRA with new tokens on an untied head, on 2 CPU ranks under the shipped ZeRO-3 config (the grown
    model built partitioned; peft's trainable tokens read the whole embedding and head outside their
    modules' forward) and on 1 process accumulating the same 2 micro-batches: the same losses and adapter.
    The ZeRO-3 adapter, on the base transformers grew to its saved tokenizer, gives in peft the one
    process's logits; its new rows trained away from their mean start; merge_lora merges it."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from tiny import train_on_two_processes
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root, tied_base, data = base_without_template
    base = root / "untied_base"
    load_tokenizer(tied_base).save_pretrained(str(base))
    torch.manual_seed(1)
    config = Qwen2Config.from_pretrained(tied_base, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(base)
    run = sft_config(root, base, data, chat_template="llama3", resize_vocab=True, max_steps=2, finetuning_type="lora",
                     lora_rank=4, lora_alpha=8, lora_dropout=0.0)  # fmt: skip
    one, zero3 = root / "lora_one", root / "lora_zero3"
    main(["train", "--config", str(run), "--output_dir", str(one), "--gradient_accumulation_steps", "2"])
    zero_config = str(Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "ds_z3_config.json")
    train_on_two_processes(run, zero3, "--deepspeed_config_path", zero_config, cwd=root)

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert losses(zero3) == pytest.approx(losses(one), abs=1e-5) and len(losses(one)) == 2
    expected, got = load_file(one / "adapter_model.safetensors"), load_file(zero3 / "adapter_model.safetensors")
    assert sorted(expected) == sorted(got)
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) < 1e-4
    tokenizer = load_tokenizer(zero3)
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in MARKERS["llama3"]]
    indices = json.loads((zero3 / "adapter_config.json").read_text())["trainable_token_indices"]
    assert {name: sorted(ids) for name, ids in indices.items()} == {"embed_tokens": new_ids, "lm_head": new_ids}
    assert len(tokenizer) == len(load_tokenizer(base)) + 3 and tokenizer.eos_token == "<|eot_id|>"
    fingerprint = json.loads((one / "base_fingerprint.json").read_text())
    assert json.loads((zero3 / "base_fingerprint.json").read_text()) == fingerprint

    def peft_model(adapter):  # peft's own loading on a base transformers grew to the adapter's tokenizer
        grown = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        grown.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        return PeftModel.from_pretrained(grown, str(adapter)).eval()

    probe = torch.tensor([chat_format(tokenizer).prompt_ids([{"role": "user", "content": "hello"}]) + new_ids])
    reference = peft_model(zero3)
    with torch.no_grad():
        logits = reference(probe).logits
        assert (logits - peft_model(one)(probe).logits).abs().max() < 1e-4
        start = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        trained = reference.get_base_model()
        for module in ("get_input_embeddings", "get_output_embeddings"):
            rows = getattr(trained, module)().weight[new_ids]  # peft's view: the trained rows merged in
            assert (rows - getattr(start, module)().weight.mean(0)).abs().amax(1).min() > 1e-3  # each row moved

    merged = root / "lora_zero3_merged"
    main(["merge_lora", "--base_model_path", str(base), "--lora_model_path", str(zero3), "--save_path", str(merged)])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(probe).logits
    assert (got - logits).abs().max() < 1e-4
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == len(tokenizer)


@pytest.mark.slow
def test_smollm2_with_llama3_and_new_tokens_trains_lora_and_loads_in_peft_and_merge_lora(smollm2_dir, tmp_path):
    """A real checkpoint (tied embeddings, vocab 49,152) given another family's template: its three markers
    are added (49,155 rows), a few LoRA steps train them, and the adapter gives peft's own logits on a
    base transformers grew, merged or not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "sft.jsonl"
    records = [{"conversations": [{"from": "human", "value": f"Say {w}"}, {"from": "gpt", "value": f"{w}!"}]} for w in
               ("yes", "no", "maybe", "ok")] * 2  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "lora"
    config = sft_config(tmp_path, Path(smollm2_dir), data, chat_template="llama3", resize_vocab=True, max_steps=2,
                        learning_rate=1e-3, finetuning_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                        cutoff_len=32)  # fmt: skip
    main(["train", "--config", str(config), "--output_dir", str(out)])
    tokenizer = load_tokenizer(out)
    assert len(tokenizer) == 49152 + 3 and tokenizer.eos_token == "<|eot_id|>"
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in MARKERS["llama3"]]
    probe = torch.tensor([chat_format(tokenizer).prompt_ids([{"role": "user", "content": "Say yes"}]) + new_ids])

    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    reference.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    reference = PeftModel.from_pretrained(reference, str(out)).eval()
    with torch.no_grad():
        expected = reference(probe).logits
    scale = expected.abs().max()
    merged = tmp_path / "merged"
    main(
        ["merge_lora", "--base_model_path", str(smollm2_dir), "--lora_model_path", str(out), "--save_path", str(merged)]
    )
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(probe).logits
    assert (got - expected).abs().max() < 1e-5 * scale
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == 49155
    # the base's eos (<|im_end|>) and the new end of turn both stop generation, in the adapter and the merge
    eos = [2, tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    for saved in (out, merged):
        assert json.loads((saved / "generation_config.json").read_text())["eos_token_id"] == eos


@pytest.mark.parametrize("tied", [False, True])
def test_lora_with_new_tokens_on_a_transformers_family_gives_peft_logits(tmp_path, tied):
    """Phi-3 (trained through transformers) with its own template added to a base tokenizer: the adapter's
    new rows, on an untied head as on a tied one, give what peft gives on transformers' grown Phi-3."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Phi3Config

    from bumblecore.inference.loading import load_for_inference

    base = tmp_path / "phi3"
    build_tokenizer(["<s>", "<|endoftext|>"], "<s>", "<|endoftext|>", base)
    rows = loaded_size(base, Phi3Config)
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, pad_token_id=0, max_position_embeddings=256, tie_word_embeddings=tied)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    data = tmp_path / "sft.jsonl"
    data.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "fine"}]}) + "\n"
    )
    out = tmp_path / "lora"
    run = sft_config(tmp_path, base, data, chat_template="phi3", resize_vocab=True, finetuning_type="lora", lora_rank=4,
                     lora_alpha=8, lora_dropout=0.0, packing=False, train_micro_batch_size_per_gpu=1)  # fmt: skip
    main(["train", "--config", str(run), "--output_dir", str(out)])
    tokenizer = load_tokenizer(out)
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in MARKERS["phi3"]]
    assert len(tokenizer) == rows + 4
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    reference.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    reference = PeftModel.from_pretrained(reference, str(out)).eval()
    probe = torch.tensor([chat_format(tokenizer).prompt_ids([{"role": "user", "content": "hello"}]) + new_ids])
    model, _, _ = load_for_inference(str(out), "float32", "cpu")
    with torch.no_grad():
        expected = reference(probe).logits
        assert (model(probe) - expected).abs().max() < 1e-4
        start = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).get_output_embeddings().weight.mean(0)
        head = reference.get_base_model().get_output_embeddings()
        # the head's rows for the new tokens trained too (tied: through the embedding's)
        assert (head(torch.eye(32))[:, new_ids].T - start).abs().max() > 1e-3
