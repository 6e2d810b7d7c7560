"""The command table: one name -> one plain function, and the one parser every command goes through.

jsonargparse builds each command's parser from the function's signature and docstring: `--help`,
`--config FILE.yaml`, command-line overrides, type checks and `--print_config`. A parameter typed with a
dataclass is a group of options (train's `run: TrainArgs` holds `run.optimization.learning_rate`);
`Options` lets users write each option as they always have. Functions are imported only when their
command runs, so `bumblecore --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

from bumblecore.options import Options

# name -> (module:function, one-line summary shown by `bumblecore --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "bumblecore.train.run:train",
        "train a model: pretrain, continue_pretrain, sft, dpo, kto or grpo; full or LoRA (flat YAML keys)",
    ),
    "init_model": (
        "bumblecore.model.init:init_model",
        "write a model dir (config.json + tokenizer, no weights) for pretraining from scratch",
    ),
    "train_tokenizer": (
        "bumblecore.tokenizer:train_tokenizer",
        "train a byte-level BPE tokenizer with the ChatML specials and chat template",
    ),
    "generate": (
        "bumblecore.inference.commands:generate",
        "generate text from a model (stdout: the text; stderr: tokens/s)",
    ),
    "chat": ("bumblecore.inference.commands:chat", "terminal chat that streams replies (/clear, /exit)"),
    "serve": (
        "bumblecore.inference.serve:serve",
        "OpenAI-compatible API (/v1/chat/completions, streaming, batched) and a web chat page",
    ),
    "merge_lora": (
        "bumblecore.model.lora:merge_lora",
        "merge a LoRA adapter into its base and save a full model, checked against the unmerged one",
    ),
    "score": (
        "bumblecore.inference.scoring:score",
        "score conversations (JSONL) with a reward model: each record plus its score",
    ),
    "convert_gguf": (
        "bumblecore.model.gguf:convert_gguf",
        "convert a GGUF checkpoint (llama.cpp) into a Hugging Face model directory",
    ),
    "inspect_data": (
        "bumblecore.data.commands:inspect_data",
        "validate a dataset and show how samples are tokenized and which tokens are trained",
    ),
    "prepare_data": (
        "bumblecore.data.commands:prepare_data",
        "tokenize a run's datasets into the token cache ahead of training",
    ),
    "eval": (
        "bumblecore.inference.evaluate:evaluate",
        "lm-evaluation-harness tasks (local YAMLs) on a model or LoRA adapter; results JSON beside the model",
    ),
    "demo": (
        "bumblecore.demo:demo",
        "the whole pipeline on the shipped demo data: pretrain -> SFT -> DPO -> merge -> evaluate",
    ),
}


def load_command(name: str):
    target, _ = COMMANDS[name]
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def print_usage(stream=None) -> None:
    stream = stream or sys.stdout
    print(
        "usage: bumblecore <command> [--config FILE.yaml] [--key value ...] [--flag] [--print_config] [--help]\n",
        file=stream,
    )
    print("commands:", file=stream)
    width = max(len(name) for name in COMMANDS)
    for name, (_, summary) in COMMANDS.items():
        print(f"  {name:<{width}}  {summary}", file=stream)
    print("\nA boolean option alone (`--do_sample`) means true; `--do_sample false` turns it off.", file=stream)
    print("Run `bumblecore <command> --help` for the options of one command.", file=stream)


def parse_arguments(name: str, function, args: list[str]) -> tuple[dict, bool]:
    """The command's arguments from YAML file(s), then the command line; and whether --print_config was
    asked for. Values reach jsonargparse by their grouped paths (see bumblecore/options.py)."""
    import yaml
    from jsonargparse import ArgumentError, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings are the --help
    options = Options(function)
    files, command_line, print_config = options.command_line(args)
    from_files = options.from_files(files)
    description = (function.__doc__ or "").strip().split("\n\n")[0]
    config_help = "Path to a configuration file."
    if options.groups:
        description += (
            "\n\nKeys are shown by their flat names, as YAML files (key: value) and --print_config spell them; "
            "the grouped spelling works too (--optimization.learning_rate, or the whole path "
            "--run.optimization.learning_rate); --yaml_config F is --config F."
        )
        config_help = "YAML file of flat (or grouped) keys; the command line overrides it"
    parser = ArgumentParser(prog=f"bumblecore {name}", exit_on_error=False, description=description)
    parser.add_argument("--config", action="config", help=config_help)
    parser.add_function_arguments(function, as_group=False)
    if any(arg in ("-h", "--help") for arg in command_line):
        print(options.flat_help(parser.format_help()), end="")
        raise SystemExit(0)
    try:
        parsed = parser.parse_args((["--config", yaml.safe_dump(from_files)] if from_files else []) + command_line)
    except ArgumentError as err:
        raise options.explained(err) from None
    arguments = parser.instantiate(parsed)
    return {key: arguments[key] for key in options.parameters}, print_config


def flat_values(values: dict) -> dict:
    """Parsed arguments with every group opened up: the flat keys a config file may hold."""
    import dataclasses

    out = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(flat_values(vars(value)))
        else:
            out[name] = value
    return out


def main(argv: list[str] | None = None) -> None:
    as_program = argv is None  # run as the program, not called from Python
    argv = list(sys.argv[1:] if as_program else argv)
    # The deepspeed launcher (and torch.distributed.launch) put `--local_rank=N` before the command;
    # the rank is in the LOCAL_RANK variable too.
    while argv and argv[0].split("=", 1)[0] in ("--local_rank", "--local-rank"):
        argv.pop(0)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_usage()
        return
    name = argv[0]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        print(f"bumblecore: unknown command `{name}`.{hint}\n", file=sys.stderr)
        print_usage(sys.stderr)
        raise SystemExit(2)
    function = load_command(name)
    try:
        arguments, print_config = parse_arguments(name, function, argv[1:])
        if print_config:  # flat, as training_args.yaml: users feed it back as a config
            import yaml

            print(yaml.safe_dump(flat_values(arguments), sort_keys=False, allow_unicode=True), end="")
        else:
            function(**arguments)
    except (ValueError, FileNotFoundError) as err:
        # Bad input is the user's to fix: one clear line, no traceback (BUMBLECORE_DEBUG=1 shows it).
        if os.environ.get("BUMBLECORE_DEBUG"):
            raise
        if not getattr(err, "reported_by_rank_zero", False):  # a multi-process run says it once, on rank 0
            print(f"bumblecore {name}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if as_program:
        leave_finished_rank()


def leave_finished_rank() -> None:
    """A rank of a multi-process run whose command has finished leaves with os._exit(0). At a normal
    exit gloo's worker threads can still be releasing the last collective's tensors while Python
    finalises; the thread then cannot take the GIL, and the C++ runtime aborts the process (exit -6,
    "terminate called without an active exception", 1 run in 6 under CPU load). The run has closed
    its files and passed its last barrier by now; the streams are flushed here."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
