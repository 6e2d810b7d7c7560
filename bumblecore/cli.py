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
    "init_model": ("bumblecore.model.init:init_model", "write a model dir (config.json + tokenizer, no weights) for pretraining from scratch"),
    "train_tokenizer": ("bumblecore.tokenizer:train_tokenizer", "train a byte-level BPE tokenizer with the ChatML specials and chat template"),
}


def load_command(name: str):
    target, _ = COMMANDS[name]
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def print_usage(stream=sys.stdout) -> None:
    print("usage: bumblecore <command> [--config FILE.yaml] [--key value ...] [--print_config] [--help]\n", file=stream)
    print("commands:", file=stream)
    width = max(len(name) for name in COMMANDS)
    for name, (_, summary) in COMMANDS.items():
        print(f"  {name:<{width}}  {summary}", file=stream)
    print("\nRun `bumblecore <command> --help` for the options of one command.", file=stream)


def _list_parameters(function) -> set[str]:
    import inspect
    import typing

    names = set()
    for name, parameter in inspect.signature(function).parameters.items():
        annotation = parameter.annotation
        if isinstance(annotation, str):  # postponed annotations
            annotation = typing.get_type_hints(function).get(name, annotation)
        origins = {typing.get_origin(annotation)} | {typing.get_origin(a) for a in typing.get_args(annotation)}
        if list in origins:
            names.add(name)
    return names


def gather_list_values(function, args: list[str]) -> list[str]:
    """Let list options take space-separated values (`--corpus a.txt b.txt`), as users expect,
    by turning them into the JSON list jsonargparse reads (`--corpus ["a.txt","b.txt"]`)."""
    import json

    list_names = _list_parameters(function)
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
            else:
                out += [arg, json.dumps(values)]
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    argv = list(sys.argv[1:] if argv is None else argv)
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
        CLI(function, args=gather_list_values(function, argv[1:]), prog=f"bumblecore {name}", as_positional=False)
    except (ValueError, FileNotFoundError) as err:
        # Bad input is the user's to fix: one clear line, no traceback (BUMBLECORE_DEBUG=1 shows it).
        if os.environ.get("BUMBLECORE_DEBUG"):
            raise
        print(f"bumblecore {name}: error: {err}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
