"""`bumblecore eval` against lm-evaluation-harness's own Hugging Face backend (HFLM, model "hf") on the same
checkpoint: every request's log-likelihood (within 1e-4) and is_greedy, every generated text and every
task metric equal; with a tokenizer that adds a BOS, an empty context, rolling windows, a user's task
over a local JSON file, and a LoRA adapter directory."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.utils import handle_non_serializable  # noqa: E402

from bumblecore.cli import main  # noqa: E402
from bumblecore.inference.eval_tasks import DEMO_DATA  # noqa: E402
from bumblecore.inference.evaluate import run_tasks, task_metrics  # noqa: E402
from bumblecore.inference.harness import BumblecoreLM  # noqa: E402

DEMO_TASKS = ["demo_qa_choice", "demo_qa_exact"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub at run time: every dataset and task is local."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hf_backend(path, **options):
    """HFLM one request at a time: batched, its generation runs a row on past its stop while the other rows
    of the batch go on (its stop criteria end a batch only when every row is done) and an EOS reached so is
    decoded away; ours stops each row at its own stop, whatever else is batched."""
    return HFLM(pretrained=str(path), **{"batch_size": 1, "dtype": "float32", "device": "cpu", **options})


def as_json(results: dict) -> dict:
    return json.loads(json.dumps(results, default=handle_non_serializable))


def compare_samples(ours: dict, theirs: dict) -> float:
    """The largest |log-likelihood difference| over every request of every task; asserts that is_greedy
    and generated texts are the same and that the metrics are equal."""
    ours, theirs = as_json(ours), as_json(theirs)  # tuples as lists, as the results JSON has them
    worst = 0.0
    assert set(ours["samples"]) == set(theirs["samples"])
    for task, samples in ours["samples"].items():
        assert len(samples) == len(theirs["samples"][task]) > 0
        for mine, hers in zip(samples, theirs["samples"][task]):
            assert mine["arguments"] == hers["arguments"]
            for a, b in zip(mine["resps"], hers["resps"], strict=True):
                if isinstance(a[0], str):  # generate_until
                    assert a == b
                elif isinstance(a[0], (list, tuple)):  # loglikelihood: (logprob, is_greedy)
                    worst = max(worst, abs(a[0][0] - b[0][0]))
                    assert a[0][1] == b[0][1]
                else:  # loglikelihood_rolling
                    worst = max(worst, abs(a[0] - b[0]))
    for task, values in ours["results"].items():
        for key, value in values.items():
            if isinstance(value, float):
                assert value == pytest.approx(theirs["results"][task][key], abs=1e-6), (task, key)
    return worst


def test_eval_command_equals_the_hf_backend(tiny_checkpoint, tmp_path, capsys):
    """The command on the shipped tasks (multiple choice by log-likelihood, exact-match generation, one
    few-shot example): its results JSON beside the model equals HFLM's run request by request."""
    model_dir = tiny_checkpoint(tmp_path / "model")
    main(["eval", "--model_path", str(model_dir), "--tasks", ",".join(DEMO_TASKS), "--limit", "12",
          "--num_fewshot", "1", "--batch_size", "4", "--log_samples"])  # fmt: skip
    ours = json.loads((model_dir / "eval_results.json").read_text())
    assert [p.name for p in model_dir.iterdir() if p.name.startswith(".")] == []  # written atomically
    printed = capsys.readouterr().out
    assert "demo_qa_choice/acc:" in printed and "demo_qa_exact/exact_match:" in printed
    theirs = run_tasks(hf_backend(model_dir), DEMO_TASKS, limit=12, num_fewshot=1, log_samples=True)
    worst = compare_samples(ours, theirs)
    assert worst < 1e-4
    assert len(ours["samples"]["demo_qa_choice"]) == 12  # documents; a request per choice
    generated = [s["resps"][0][0] for s in ours["samples"]["demo_qa_exact"]]
    assert any(generated) and all("\n" not in text for text in generated)  # cut at the task's `until`
    assert set(task_metrics(ours)) == {"demo_qa_choice/acc", "demo_qa_choice/acc_norm", "demo_qa_exact/exact_match"}


def bos_checkpoint(tiny_checkpoint, out):
    """The tiny checkpoint with a tokenizer that puts a BOS (<|im_start|>, not its EOS) before every text,
    as Llama's and Gemma's do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from bumblecore.tokenizer import load_tokenizer

    tiny_checkpoint(out)
    backend = load_tokenizer(out).backend_tokenizer
    bos = backend.token_to_id("<|im_start|>")
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]),
        ]
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).unlink()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|endoftext|>"
    ).save_pretrained(str(out))
    return out


def test_bos_conventions_rolling_windows_and_a_local_json_task(tiny_checkpoint, tmp_path):
    """A tokenizer that adds a BOS: requests with an empty context (the prefix token, BOS), a context that
    already starts with the BOS (not added twice), a user's perplexity task (include_path) reading a local
    JSON file (`dataset_path: json`) in rolling windows of 32 tokens, and the shipped tasks' prompts cut to
    that context: all equal HFLM's."""
    model_dir = bos_checkpoint(tiny_checkpoint, tmp_path / "model")
    ours, theirs = BumblecoreLM(str(model_dir), batch_size=4, max_length=32), hf_backend(model_dir, max_length=32)
    assert ours.tok_encode("a cat")[0] == ours.tokenizer.bos_token_id == ours.prefix_token_id
    pairs = [("", " the quiet cat"), ("<|im_start|>The owl", " went home"), ("In the garden,", " the hare"),
             ("When the sky turned green, " * 6, "the mole hid a key")]  # fmt: skip
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    mine, hers = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert [g for _, g in mine] == [g for _, g in hers]
    assert max(abs(a - b) for (a, _), (b, _) in zip(mine, hers)) < 1e-4

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join((DEMO_DATA / "pretrain_eval.jsonl").read_text().splitlines(keepends=True)[:3]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "texts.yaml").write_text(
        "task: local_texts\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(texts))}}}, cache_dir: {json.dumps(str(tmp_path / 'cache'))}}}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    mine = run_tasks(ours, ["local_texts"], include_path=[str(tasks)], log_samples=True)
    hers = run_tasks(theirs, ["local_texts"], include_path=[str(tasks)], log_samples=True)
    assert len(ours.tok_encode(texts.read_text().splitlines()[0])) > 2 * 32  # several windows each
    assert compare_samples(mine, hers) < 1e-4
    assert task_metrics(mine)["local_texts/word_perplexity"] > 1
    # One-shot prompts of ~50 tokens: kept to their last 32 - 8 (max_gen_toks) tokens for generation.
    mine = run_tasks(ours, DEMO_TASKS, limit=8, num_fewshot=1, log_samples=True)
    hers = run_tasks(theirs, DEMO_TASKS, limit=8, num_fewshot=1, log_samples=True)
    assert compare_samples(mine, hers) < 1e-4


def test_a_lora_adapter_directory_equals_the_hf_backend_with_peft(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model
    from tiny import DEMO_TOKENIZER
    from transformers import AutoModelForCausalLM

    from bumblecore.tokenizer import load_tokenizer

    # HFLM resizes the embeddings of a model it applies peft to to len(tokenizer): a base of that size
    # keeps its softmax over the same vocabulary as ours
    base = tiny_checkpoint(tmp_path / "base", vocab_size=len(load_tokenizer(DEMO_TOKENIZER)))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a trained-looking adapter (peft starts B at zero)
    model.save_pretrained(tmp_path / "adapter")
    mine = run_tasks(BumblecoreLM(str(tmp_path / "adapter")), ["demo_qa_choice"], limit=6, log_samples=True)
    hers = run_tasks(hf_backend(base, peft=str(tmp_path / "adapter")), ["demo_qa_choice"], limit=6, log_samples=True)
    plain = run_tasks(hf_backend(base), ["demo_qa_choice"], limit=6, log_samples=True)
    assert compare_samples(mine, hers) < 1e-4
    first = [s["resps"][0][0][0] for s in mine["samples"]["demo_qa_choice"]]
    assert max(abs(a - s["resps"][0][0][0]) for a, s in zip(first, plain["samples"]["demo_qa_choice"])) > 1e-2


def test_unknown_tasks_and_generation_options_are_refused_by_name(tiny_checkpoint, tmp_path, capsys):
    from bumblecore.inference.harness import sampling_params

    model_dir = tiny_checkpoint(tmp_path / "model")
    with pytest.raises(SystemExit):
        main(["eval", "--model_path", str(model_dir), "--tasks", "demo_qa_choise"])
    err = capsys.readouterr().err
    assert "--tasks demo_qa_choise: no such task" in err and "demo_qa_exact" in err
    assert not (model_dir / "eval_results.json").exists()
    with pytest.raises(ValueError, match="generation_kwargs num_beams"):
        sampling_params({"do_sample": False, "num_beams": 4}, ["\n"], 8)


@pytest.mark.slow
def test_a_real_model_equals_the_hf_backend(smollm2_dir):
    """SmolLM2-135M-Instruct (Llama layout, its own tokenizer) on both shipped tasks with two few-shot
    examples: the same requests, log-likelihoods, greedy flags, generated texts and metrics as HFLM."""
    ours = run_tasks(BumblecoreLM(str(smollm2_dir), batch_size=4), DEMO_TASKS, limit=3, num_fewshot=2, log_samples=True)
    # batched: the model's generation_config ends a row at its EOS (<|im_end|>) by itself
    theirs = run_tasks(hf_backend(smollm2_dir, batch_size=4), DEMO_TASKS, limit=3, num_fewshot=2, log_samples=True)
    assert compare_samples(ours, theirs) < 1e-4
