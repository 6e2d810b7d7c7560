"""The command table: help, config files, overrides, --print_config, clear errors; init_model's output."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from bumblecore import Bumblebee, BumblebeeConfig, load_tokenizer
from bumblecore.cli import COMMANDS, flat_values, load_command, main
from bumblecore.model.hf_config import read_config
from bumblecore.options import Options, is_bool


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bumblecore", *map(str, args)], capture_output=True, text=True)


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "init_model" in result.stdout and "train_tokenizer" in result.stdout
    detail = run_cli("init_model", "--help")
    assert detail.returncode == 0 and "--num_hidden_layers" in detail.stdout and "--print_config" in detail.stdout


def test_unknown_command_suggests_nearest():
    result = run_cli("init_mode")
    assert result.returncode == 2 and "init_model" in result.stderr


def test_init_model_preset_equals_transformers(tmp_path, tokenizer_dir):
    out = tmp_path / "model"
    main(["init_model", "--preset", "0.5B", "--tokenizer_path", str(tokenizer_dir), "--output_dir", str(out)])
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "qwen2" and raw["vocab_size"] == 151936 and raw["hidden_size"] == 896
    assert not list(out.glob("*.safetensors"))
    assert load_tokenizer(out).chat_template  # tokenizer travels with the model dir
    generation = json.loads((out / "generation_config.json").read_text())
    tok = load_tokenizer(tokenizer_dir)
    assert set(generation["eos_token_id"]) == {
        tok.convert_tokens_to_ids("<|im_end|>"),
        tok.convert_tokens_to_ids("<|endoftext|>"),
    }
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
        ours = Bumblebee(BumblebeeConfig.from_preset("0.5B"))
    assert hf.num_parameters() == ours.num_parameters() == 494_032_768


def test_init_model_refuses_a_non_empty_output_dir_and_overwrite_replaces_it_whole(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "init"
    tiny = ["init_model", "--tokenizer_path", str(tokenizer_dir), "--output_dir", str(out), "--num_hidden_layers"]
    main([*tiny, "2"])
    (out / "model.safetensors").write_bytes(b"weights a run wrote here")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main([*tiny, "3"])
    message = capsys.readouterr().err
    assert refused.value.code == 1 and f"output_dir {out} is not empty (" in message and "model.safetensors" in message
    assert "set overwrite_output_dir: true to replace it, or choose another output_dir" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    main([*tiny, "3", "--overwrite_output_dir"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert not (out / "model.safetensors").exists()  # replaced whole: no weights of the old model stay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]  # no staging left beside it


@pytest.mark.slow
def test_config_file_overrides_and_print_config(tmp_path, tokenizer_dir):
    config = tmp_path / "init.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "preset": "0.5B",
                "tokenizer_path": str(tokenizer_dir),
                "output_dir": str(tmp_path / "m"),
                "num_hidden_layers": 3,
                "vocab_size": 1024,
            }
        )
    )
    printed = run_cli(
        "init_model", "--config", config, "--hidden_size", 128, "--num_attention_heads", 4, "--print_config"
    )
    assert printed.returncode == 0, printed.stderr
    resolved = yaml.safe_load(printed.stdout)
    assert resolved["num_hidden_layers"] == 3 and resolved["hidden_size"] == 128  # file, then command line
    assert not (tmp_path / "m").exists()  # --print_config only prints
    made = run_cli(
        "init_model", "--config", config, "--hidden_size", 128, "--num_attention_heads", 4, "--num_key_value_heads", 2
    )
    assert made.returncode == 0, made.stderr
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (raw["num_hidden_layers"], raw["hidden_size"], raw["vocab_size"]) == (3, 128, 1024)
    cfg = read_config(tmp_path / "m")
    assert Bumblebee(cfg).num_parameters() == cfg.num_parameters_estimate


def test_tokenizer_larger_than_vocab_is_a_clear_error(tmp_path, tokenizer_dir):
    result = run_cli(
        "init_model",
        "--preset",
        "0.5B",
        "--tokenizer_path",
        tokenizer_dir,
        "--output_dir",
        tmp_path / "m",
        "--vocab_size",
        64,
    )
    assert result.returncode == 1
    assert "vocab_size is 64" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()


def test_train_tokenizer_command_takes_several_files(tmp_path, corpus_files):
    out = tmp_path / "tok"
    result = run_cli("train_tokenizer", "--corpus", *corpus_files, "--vocab_size", 300, "--output_dir", out)
    assert result.returncode == 0, result.stderr
    assert "from 2 file(s)" in result.stdout
    assert load_tokenizer(out).decode(load_tokenizer(out).encode("蜜蜂 reads 🐝")) == "蜜蜂 reads 🐝"


def test_public_api_forward(tmp_path):
    cfg = BumblebeeConfig.from_preset(
        "0.5B",
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = Bumblebee(cfg)
    logits = model(torch.randint(0, 128, (2, 5)))
    assert logits.shape == (2, 5, 128)
    with pytest.raises(ValueError, match="unknown preset"):
        BumblebeeConfig.from_preset("0.6B")


def _recorder(function, calls):
    """`function`'s signature and docstring (what the parser is built from), recording its arguments."""
    import functools

    @functools.wraps(function)
    def record(*args, **kwargs):
        calls.append((args, kwargs))

    return record


def flat_options(function) -> dict:
    """Each option's flat name (what users type) -> its annotation."""
    options = Options(function)
    return {options.flat(path): annotation for path, annotation in options.types.items()}


def _required(function):
    import inspect

    groups = Options(function).groups  # a group of options (train's run) is given by its keys, each with a default
    return [
        a
        for name, p in inspect.signature(function).parameters.items()
        if p.default is inspect.Parameter.empty and name not in groups
        for a in (f"--{name}", "x")
    ]


def _other_option(function) -> tuple[str, object]:
    """An int (or else a string) option of the command and a value, to stand beside bare flags."""
    import typing

    types = flat_options(function)
    for kinds, value in (((int, typing.Optional[int]), 7), ((str, typing.Optional[str]), "seven")):
        for name, annotation in types.items():
            if annotation in kinds and f"--{name}" not in _required(function):
                return name, value
    raise AssertionError(f"{function.__name__} has no int or str option")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_boolean_option_takes_the_bare_form(monkeypatch, name):
    import bumblecore.cli as cli

    function = load_command(name)
    flags = sorted(name for name, annotation in flat_options(function).items() if is_bool(annotation))
    assert flags or name not in ("train", "generate", "init_model")  # a group's too (train's packing, save_last)
    if not flags:
        return
    calls = []
    monkeypatch.setattr(cli, "load_command", lambda _: _recorder(function, calls))

    def parsed(*argv):
        calls.clear()
        cli.main([name, *_required(function), *map(str, argv)])
        ((args, kwargs),) = calls
        return flat_values(kwargs)  # train's run opened up into its flat keys

    other, value = _other_option(function)
    bare = [f"--{flag}" for flag in flags]  # each followed by the next option, the last by nothing
    for argv in ([*bare, f"--{other}", value], [f"--{other}", value, *bare]):
        values = parsed(*argv)
        assert all(values[flag] is True for flag in flags), argv
        assert values[other] == value
    forms = [
        (["--{}=true"], True),
        (["--{}=false"], False),
        (["--{}", "false"], False),
        (["--{}", "true"], True),
        (["--{}"], True),
    ]
    for turn in range(len(forms)):  # every written form on every flag
        argv, expected = [], {}
        for i, flag in enumerate(flags):
            words, value = forms[(i + turn) % len(forms)]
            argv += [w.format(flag) for w in words]
            expected[flag] = value
        values = parsed(*argv)
        assert {flag: values[flag] for flag in flags} == expected, argv


def test_bare_flags_beside_lists_and_print_config(tmp_path, capsys):
    def printed(*argv):
        capsys.readouterr()
        try:
            main([*map(str, argv), "--print_config"])
        except SystemExit as stop:  # jsonargparse exits after printing
            assert stop.code in (None, 0)
        return yaml.safe_load(capsys.readouterr().out)

    resolved = printed(
        "generate", "--model_path", "m", "--prompt", "hi", "--stop", "a", "b", "--ignore_eos", "--do_sample"
    )
    assert resolved["stop"] == ["a", "b"] and resolved["ignore_eos"] is True and resolved["do_sample"] is True
    assert resolved["trust_remote_code"] is False
    resolved = printed(
        "init_model", "--tokenizer_path", "t", "--output_dir", "o", "--tie_word_embeddings", "--attention_bias", "null"
    )
    assert resolved["tie_word_embeddings"] is True and resolved["attention_bias"] is None  # Optional[bool] keeps null
    config = tmp_path / "run.yaml"
    config.write_text("packing: false\nsave_last: false\n")
    resolved = printed(
        "train", "--config", config, "--packing", "--lora_target_modules", "q_proj", "v_proj", "--save_last"
    )
    assert resolved["packing"] is True and resolved["save_last"] is True  # the command line over the file
    assert resolved["lora_target_modules"] == ["q_proj", "v_proj"]


def test_a_list_option_given_null_or_empty_means_none(capsys):
    """`--eval_dataset_path null` (or "") is no eval set, not a dataset file named "null" or the cwd."""
    for value in ("null", "None", ""):
        capsys.readouterr()
        main(["train", "--dataset_path", "d.jsonl", "--eval_dataset_path", value, "--seed", "7", "--print_config"])
        resolved = yaml.safe_load(capsys.readouterr().out)
        assert (
            resolved["eval_dataset_path"] is None and resolved["seed"] == 7 and resolved["dataset_path"] == ["d.jsonl"]
        )


def test_train_keys_flat_or_grouped_give_the_same_run(tmp_path, capsys):
    """Flat keys (the original's), grouped ones and the full path name the same settings, in files and
    on the command line; YAML 1.1's string `5e-5` is the float it means."""

    def printed(*argv):
        capsys.readouterr()
        main(["train", *map(str, argv), "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    flat, grouped = tmp_path / "flat.yaml", tmp_path / "grouped.yaml"
    flat.write_text("learning_rate: 5e-5\nlora_rank: 8\nlabel_smoothing: 0.1\ndataset_path: [a.jsonl, b.jsonl]\n")
    grouped.write_text(
        "optimization:\n  learning_rate: 5e-5\nlora: {lora_rank: 8}\npreference: {label_smoothing: 0.1}\n"
        "data: {dataset_path: [a.jsonl, b.jsonl]}\n"
    )
    from_flat = printed("--config", flat)
    assert from_flat["learning_rate"] == 5e-5 and isinstance(from_flat["learning_rate"], float)
    assert from_flat["lora_rank"] == 8 and from_flat["dpo_label_smoothing"] == 0.1
    assert printed("--config", grouped) == from_flat
    assert (
        printed(
            "--optimization.learning_rate",
            "5e-5",
            "--lora.lora_rank",
            "8",
            "--run.preference.dpo_label_smoothing",
            "0.1",
            "--dataset_path",
            "a.jsonl",
            "b.jsonl",
        )
        == from_flat
    )
    with pytest.raises(SystemExit):
        main(["train", "--optimization.learnig_rate", "1"])
    assert (
        "unknown option --optimization.learnig_rate (did you mean 'optimization.learning_rate'?)"
        in capsys.readouterr().err
    )


def test_every_command_takes_the_same_spellings_and_errors_name_the_key_as_written(tmp_path, capsys):
    """One parser for every command: `--yaml_config` (a file that names itself too), and a bad value or an
    unknown key is one line naming the key as the user wrote it (flat, grouped or the original's alias),
    where it came from, and the nearest valid key (docs/CONFIG.md)."""
    config = tmp_path / "init.yaml"
    config.write_text(f"yaml_config: {config}\ntokenizer_path: t\noutput_dir: o\nnum_hidden_layers: 3\n")
    resolved = _printed(capsys, "init_model", "--yaml_config", config, "--tie_word_embeddings")
    assert (resolved["num_hidden_layers"], resolved["tie_word_embeddings"], resolved["output_dir"]) == (3, True, "o")
    overridden = tmp_path / "overridden.yaml"  # the command line wins: the file's value is not even checked
    overridden.write_text("learning_rate: abc\nlora: {lora_target_modules: [q_proj]}\n")
    resolved = _printed(
        capsys, "train", "--config", overridden, "--learning_rate", "1e-3", "--lora_target_modules+", "v_proj"
    )
    assert resolved["learning_rate"] == 1e-3 and resolved["lora_target_modules"] == ["q_proj", "v_proj"]  # + appends
    alias = tmp_path / "alias.yaml"
    alias.write_text("preference:\n  label_smoothing: abc\n")
    tiny = ["--tokenizer_path", "t", "--output_dir", "o"]
    for argv, message in (
        (
            ["init_model", *tiny, "--num_hidden_layers", "x"],
            "command line: key 'num_hidden_layers' expects int or null, got 'x'",
        ),
        (["init_model", *tiny, "--prest", "7B"], "unknown option --prest (did you mean 'preset'?)"),
        (["init_model", "--config", alias], f"{alias}: unknown key 'preference' (did you mean 'preset'?)"),
        (["train", "--config", alias], f"{alias}: key 'preference.label_smoothing' expects float, got 'abc'"),
        (["train", "--label_smoothing", "abc"], "command line: key 'label_smoothing' expects float, got 'abc'"),
        (["train", "--optimization.seed=x"], "command line: key 'optimization.seed' expects int, got 'x'"),
        (
            ["generate", "--model_path", "m", "--sampling.top_k", "x"],
            "command line: key 'sampling.top_k' expects int, got 'x'",
        ),
    ):
        with pytest.raises(SystemExit) as stop:
            main([*map(str, argv)])
        assert (stop.value.code, capsys.readouterr().err) == (1, f"bumblecore {argv[0]}: error: {message}\n"), argv


def test_train_help_shows_every_key_with_its_docstring():
    import ast
    import inspect

    import bumblecore.args as schema
    import bumblecore.args.stages as stage_schema
    from bumblecore.args import TrainArgs, flat_defaults, group_types

    result = run_cli("train", "--help")
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stdout.split())
    documented = {}
    train_groups = {group.__name__ for group in group_types(TrainArgs).values()}
    for node in [*ast.parse(inspect.getsource(schema)).body, *ast.parse(inspect.getsource(stage_schema)).body]:
        if isinstance(node, ast.ClassDef) and node.name in train_groups:
            for field, doc in zip(node.body, node.body[1:]):
                if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr):
                    documented[field.target.id] = " ".join(doc.value.value.split())
    assert set(documented) == set(flat_defaults())  # every key has a docstring
    for key, doc in documented.items():
        assert f"--{key} " in shown and doc in shown, key  # by its flat name, as users type it
    assert "--run." not in shown.replace("--run.optimization.learning_rate);", "")  # (the description's example)


SAMPLING_COMMANDS = {  # each command's own sampling defaults, unchanged from the loose flags they replace
    "generate": {"max_new_tokens": 256, "do_sample": False},
    "chat": {"max_new_tokens": 512, "do_sample": False},
    "serve": {"max_new_tokens": None, "do_sample": True},
}


def _printed(capsys, *argv) -> dict:
    capsys.readouterr()
    main([*map(str, argv), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", list(SAMPLING_COMMANDS))
def test_sampling_options_flat_or_grouped_with_each_commands_defaults(name, tmp_path, capsys):
    from bumblecore.inference.sampling import SamplingArgs

    defaults = _printed(capsys, name, "--model_path", "m")
    assert {key: defaults[key] for key in SAMPLING_COMMANDS[name]} == SAMPLING_COMMANDS[name]
    assert (defaults["temperature"], defaults["top_k"], defaults["top_p"], defaults["repetition_penalty"]) == (
        1.0,
        0,
        1.0,
        1.0,
    )
    flat = _printed(
        capsys,
        name,
        "--model_path",
        "m",
        "--max_new_tokens",
        24,
        "--do_sample",
        "--temperature",
        0.9,
        "--top_p",
        0.9,
        "--top_k",
        20,
        "--repetition_penalty",
        1.1,
    )
    grouped = _printed(
        capsys,
        name,
        "--model_path",
        "m",
        "--sampling.max_new_tokens",
        24,
        "--sampling.do_sample",
        "true",
        "--sampling.temperature",
        0.9,
        "--sampling.top_p",
        0.9,
        "--sampling.top_k",
        20,
        "--sampling.repetition_penalty",
        1.1,
    )
    config = tmp_path / "sampling.yaml"
    config.write_text(
        "model_path: m\nmax_new_tokens: 24\ndo_sample: true\ntemperature: 0.9\ntop_p: 0.9\ntop_k: 20\n"
        "repetition_penalty: 1.1\n"
    )
    assert flat == grouped == _printed(capsys, name, "--config", config)
    assert {key: flat[key] for key in vars(SamplingArgs())} == dict(
        max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.9, top_k=20, repetition_penalty=1.1
    )
    assert (
        _printed(capsys, name, "--model_path", "m", "--temperature", 0.2, "--do_sample", "false")["do_sample"] is False
    )


@pytest.mark.parametrize("name", list(SAMPLING_COMMANDS))
def test_sampling_options_out_of_range_are_refused_by_every_command(name, capsys):
    from bumblecore.inference.sampling import SamplingArgs

    expected = "expected 0 <= temperature <= 100, 0 < top_p <= 1, top_k >= 0 and 0.01 <= repetition_penalty <= 10"
    for option, value in (("--temperature", 101), ("--top_p", 0), ("--top_k", -1), ("--repetition_penalty", 0.001)):
        with pytest.raises(SystemExit) as stop:
            main([name, "--model_path", "m", option, str(value)])
        assert stop.value.code == 1
        assert expected in capsys.readouterr().err, (option, value)
    with pytest.raises(ValueError, match="0 <= temperature <= 100"):  # a Python caller's NaN too
        SamplingArgs(temperature=float("nan"))


@pytest.mark.parametrize("name", list(SAMPLING_COMMANDS))
def test_sampling_help_shows_every_option_with_its_docstring(name, capsys):
    import ast
    import inspect

    from bumblecore.inference.sampling import SamplingArgs

    with pytest.raises(SystemExit) as stop:
        main([name, "--help"])
    assert stop.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    body = ast.parse(inspect.getsource(SamplingArgs)).body[0].body
    documented = {
        field.target.id: " ".join(doc.value.value.split())
        for field, doc in zip(body, body[1:])
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr)
    }
    assert set(documented) == set(vars(SamplingArgs()))
    for key, doc in documented.items():
        assert f"--{key} " in shown and doc in shown, key  # by its flat name, as users type it
