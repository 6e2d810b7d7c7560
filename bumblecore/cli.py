"""The command table: one name -> one plain function.

jsonargparse builds each command's parser from the function's signature and
docstring, so `--help`, `--config FILE.yaml`, command-line overrides and
`--print_config` come for free. Functions are imported only when their command
runs, so `bumblecore --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module:function, one-line summary shown by `bumblecore --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bumblecore.train.run:train", "train a model: pretrain, continue_pretrain, sft or dpo; full or LoRA (flat YAML keys)"),
    "init_model": ("bumblecore.model.init:init_model", "write a model dir (config.json + tokenizer, no weights) for pretraining from scratch"),
    "train_tokenizer": ("bumblecore.tokenizer:train_tokenizer", "train a byte-level BPE tokenizer with the ChatML specials and chat template"),
    "generate": ("bumblecore.inference.commands:generate", "generate text from a model (stdout: the text; stderr: tokens/s)"),
    "chat": ("bumblecore.inference.commands:chat", "terminal chat that streams replies (/clear, /exit)"),
    "serve": ("bumblecore.inference.serve:serve", "OpenAI-compatible API (/v1/chat/completions, streaming, batched) and a web chat page"),
    "merge_lora": ("bumblecore.train.lora:merge_lora", "merge a LoRA adapter into its base and save a full model, checked against the unmerged one"),
    "inspect_data": ("bumblecore.data.commands:inspect_data", "validate a dataset and show how samples are tokenized and which tokens are trained"),
    "prepare_data": ("bumblecore.data.commands:prepare_data", "tokenize a run's datasets into the token cache ahead of training"),
    "demo": ("bumblecore.demo:demo", "the whole pipeline on the shipped demo data: pretrain -> SFT -> DPO -> merge -> evaluate"),
}


def load_command(name: str):
    target, _ = COMMANDS[name]
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def print_usage(stream=sys.stdout) -> None:
    print("usage: bumblecore <command> [--config FILE.yaml] [--key value ...] [--flag] [--print_config] [--help]\n", file=stream)
    print("commands:", file=stream)
    width = max(len(name) for name in COMMANDS)
    for name, (_, summary) in COMMANDS.items():
        print(f"  {name:<{width}}  {summary}", file=stream)
    print("\nA boolean option alone (`--do_sample`) means true; `--do_sample false` turns it off.", file=stream)
    print("Run `bumblecore <command> --help` for the options of one command.", file=stream)


def _parameter_types(function) -> dict[str, object]:
    """name -> the parameter's annotation, with postponed (string) annotations resolved."""
    import inspect
    import typing

    hints = None
    types = {}
    for name, parameter in inspect.signature(function).parameters.items():
        annotation = parameter.annotation
        if isinstance(annotation, str):  # postponed annotations
            hints = typing.get_type_hints(function) if hints is None else hints
            annotation = hints.get(name, annotation)
        types[name] = annotation
    return types


def _list_parameters(function) -> set[str]:
    import typing

    names = set()
    for name, annotation in _parameter_types(function).items():
        origins = {typing.get_origin(annotation)} | {typing.get_origin(a) for a in typing.get_args(annotation)}
        if list in origins:
            names.add(name)
    return names


def bool_parameters(function) -> set[str]:
    """Parameters typed `bool` or `Optional[bool]`: the ones a bare `--flag` may switch on."""
    import typing

    names = set()
    for name, annotation in _parameter_types(function).items():
        if annotation is bool or (typing.get_origin(annotation) is typing.Union
                                  and set(typing.get_args(annotation)) == {bool, type(None)}):
            names.add(name)
    return names


def bare_flags_true(args: list[str], bool_names: set[str]) -> list[str]:
    """`--flag` alone (last, or followed by another option) means `--flag true`, as people type
    boolean flags; `--flag false`, `--flag=true` and `--flag null` are left to jsonargparse."""
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg.startswith("--") and "=" not in arg and arg[2:] in bool_names:
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or following.startswith("-"):  # a boolean's value never starts with "-"
                out.append("true")
    return out


def gather_list_values(function, args: list[str], more_list_names: set[str] = frozenset()) -> list[str]:
    """Let list options take space-separated values (`--corpus a.txt b.txt`), as users expect,
    by turning them into the JSON list jsonargparse reads (`--corpus ["a.txt","b.txt"]`)."""
    import json

    list_names = _list_parameters(function) | set(more_list_names)
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        name = arg[2:].split("=", 1)[0].rstrip("+")
        if arg.startswith("--") and "=" not in arg and name in list_names:
            values = []
            while i + 1 < len(args) and not args[i + 1].startswith("--"):
                values.append(args[i + 1])
                i += 1
            if len(values) == 1 and values[0].lstrip().startswith("["):
                out += [arg, values[0]]  # already a list literal
            elif len(values) == 1 and values[0].strip().lower() in ("null", "none", ""):
                out += [arg, "null"]  # "no list" (e.g. --eval_dataset_path null), not a file named null
            else:
                out += [arg, json.dumps(values)]
        else:
            out.append(arg)
        i += 1
    return out


def takes_train_config(function) -> bool:
    import inspect

    parameters = list(inspect.signature(function).parameters.values())
    return bool(parameters) and parameters[0].name == "config" and "TrainConfig" in str(parameters[0].annotation)


def _split_config_args(args: list[str]) -> tuple[list[str], list[str], bool]:
    """Pull `--config F` / `--yaml_config F` (the original's spelling) and `--print_config` out of args."""
    files, rest, print_config, i = [], [], False, 0
    while i < len(args):
        arg = args[i]
        key = arg.split("=", 1)[0]
        if key in ("--config", "--yaml_config"):
            if "=" in arg:
                files.append(arg.split("=", 1)[1])
            elif i + 1 < len(args):
                files.append(args[i + 1])
                i += 1
            else:
                raise ValueError(f"{arg} needs a file")
        elif arg == "--print_config":
            print_config = True
        else:
            rest.append(arg)
        i += 1
    return files, rest, print_config


def run_train_config_command(name: str, function, args: list[str]) -> None:
    """Commands over a run's flat config (train, prepare_data, inspect_data): every key of TrainConfig
    plus the function's own options; YAML file(s), then the command line; unknown keys are errors
    that name the nearest valid key."""
    from jsonargparse import ArgumentParser

    from bumblecore.train.config import ALIASES, FIELDS, TrainConfig, build_config, load_yaml, nearest_key, to_yaml

    files, rest, print_config = _split_config_args(args)
    parser = ArgumentParser(prog=f"bumblecore {name}", description=(function.__doc__ or "").strip().split("\n")[0],
                            exit_on_error=True)
    parser.add_argument("--config", help="flat YAML config file (also --yaml_config); the command line overrides it")
    parser.add_argument("--print_config", action="store_true", help="print the resolved configuration as YAML and exit")
    parser.add_class_arguments(TrainConfig, nested_key=None, as_group=False)
    own = _own_parameters(function)
    if own:
        parser.add_function_arguments(function, nested_key=None, skip={"config"}, as_group=False)
    known = set(FIELDS) | set(own)

    for arg in rest:
        if arg.startswith("--") and arg not in ("--help", "-h"):
            key = arg[2:].split("=", 1)[0].rstrip("+")
            if ALIASES.get(key, key) not in known:
                raise ValueError(f"unknown option --{key}{nearest_key(key)}")
    defaults = {}
    for file in files:
        for key, value in load_yaml(file).items():
            key = ALIASES.get(key, key)
            if key not in known:
                raise ValueError(f"{file}: unknown key {key!r}{nearest_key(key)}")
            defaults[key] = value
    rest = [f"--{ALIASES[a[2:]]}" if a.startswith("--") and a[2:] in ALIASES else a for a in rest]
    rest = bare_flags_true(rest, bool_parameters(TrainConfig) | (bool_parameters(function) & set(own)))
    if defaults:
        parser.set_defaults(**defaults)
    namespace = parser.parse_args(gather_list_values(function, rest, _list_parameters(TrainConfig)))
    values = namespace.as_dict()
    config = build_config({k: values[k] for k in FIELDS if k in values}, source=files[-1] if files else "command line")
    extras = {k: values[k] for k in own}
    if print_config:
        print(to_yaml(config), end="")
        for key, value in extras.items():
            print(f"{key}: {value}")
        return
    function(config, **extras)


def _own_parameters(function) -> list[str]:
    import inspect

    return list(inspect.signature(function).parameters)[1:]


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    argv = list(sys.argv[1:] if argv is None else argv)
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
        if takes_train_config(function):
            run_train_config_command(name, function, argv[1:])
        else:
            args = bare_flags_true(argv[1:], bool_parameters(function))
            CLI(function, args=gather_list_values(function, args), prog=f"bumblecore {name}", as_positional=False)
    except (ValueError, FileNotFoundError) as err:
        # Bad input is the user's to fix: one clear line, no traceback (BUMBLECORE_DEBUG=1 shows it).
        if os.environ.get("BUMBLECORE_DEBUG"):
            raise
        print(f"bumblecore {name}: error: {err}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
