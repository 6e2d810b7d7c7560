"""The command table: one name -> one plain function.

jsonargparse builds each command's parser from the function's signature and
docstring, so `--help`, `--config FILE.yaml`, command-line overrides and
`--print_config` come for free. A command whose signature has dataclass groups
(train's `run: TrainArgs`) also takes every key by its flat name (see "options and
their spellings" below). Functions are imported only when their command runs, so
`bumblecore --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

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
    "demo": (
        "bumblecore.demo:demo",
        "the whole pipeline on the shipped demo data: pretrain -> SFT -> DPO -> merge -> evaluate",
    ),
}


def load_command(name: str):
    target, _ = COMMANDS[name]
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def print_usage(stream=sys.stdout) -> None:
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


# ---------------------------------------------------------------------------- options and their spellings
#
# A parameter typed with a dataclass is a group of options (a dataclass field typed with a dataclass is a
# group within it): `train(run: TrainArgs)` has `run.optimization.learning_rate`. Every option keeps the
# flat name users type (`--learning_rate`, `learning_rate:` in YAML): any dotted tail of its path names it
# (`learning_rate`, `optimization.learning_rate`, the whole path), as do the original's names a group
# lists in its `aliases`. jsonargparse parses the grouped form; the layer below only rewrites spellings.


def _type_hints(owner) -> dict[str, object]:
    """Annotations of a function's parameters or a dataclass's fields, postponed (string) ones resolved."""
    import typing

    try:
        return typing.get_type_hints(owner)
    except (NameError, TypeError):  # a name only imported for type checkers: keep the raw annotations
        return dict(getattr(owner, "__annotations__", {}))


def _parameter_types(function) -> dict[str, object]:
    """name -> the parameter's annotation (inspect.Parameter.empty where it has none)."""
    import inspect

    hints = _type_hints(function)
    return {
        name: hints.get(name, parameter.annotation)
        for name, parameter in inspect.signature(function).parameters.items()
    }


def option_paths(function) -> tuple[dict[str, object], dict[str, str]]:
    """(path -> annotation of every option, spelling -> path for every way to name an option or a group)."""
    import dataclasses

    options, spellings, ambiguous = {}, {}, set()

    def spell(path: str, target: str) -> None:
        parts = path.split(".")
        for i in range(len(parts)):
            tail = ".".join(parts[i:])
            if spellings.setdefault(tail, target) != target:
                ambiguous.add(tail)  # two options share this tail: only a longer spelling names either

    def add(path: str, annotation) -> None:
        spell(path, path)
        if not (isinstance(annotation, type) and dataclasses.is_dataclass(annotation)):
            options[path] = annotation
            return
        hints = _type_hints(annotation)
        for field in dataclasses.fields(annotation):
            add(f"{path}.{field.name}", hints.get(field.name, field.type))
        for old, new in getattr(annotation, "aliases", {}).items():
            spell(f"{path}.{old}", f"{path}.{new}")

    for name, annotation in _parameter_types(function).items():
        add(name, annotation)
    return options, {tail: path for tail, path in spellings.items() if tail not in ambiguous}


def option_groups(function) -> set[str]:
    """Paths of the dataclass groups in the function's signature (empty for a plain command)."""
    options, spellings = option_paths(function)
    return set(spellings.values()) - set(options)


def _flat_names(options: dict, spellings: dict) -> dict[str, str]:
    """path -> the option's flat name: the shortest spelling that names it (usually its field name)."""
    names = {}
    for tail, path in sorted(spellings.items(), key=lambda item: item[0].count(".")):
        if path in options and path not in names and tail.rsplit(".", 1)[-1] == path.rsplit(".", 1)[-1]:
            names[path] = tail
    return names


def flat_help(text: str, function) -> str:
    """jsonargparse's help with every option and group under its shortest spelling (`--learning_rate`, not
    `--run.optimization.learning_rate`): what users type and what YAML files and --print_config write."""
    import re

    options, spellings = option_paths(function)
    shortest = _flat_names(options, spellings)  # an option: its own field name, not an older alias
    for tail, path in spellings.items():  # a group: its shortest spelling
        if path not in options and (path not in shortest or len(tail) < len(shortest[path])):
            shortest[path] = tail
    for path in sorted(shortest, key=len, reverse=True):
        text = re.sub(rf"--{re.escape(path)}(?=[\s\],=+]|$)", f"--{shortest[path]}", text)
    return text


def flat_options(function) -> dict[str, object]:
    """Each option's flat name -> its annotation."""
    options, spellings = option_paths(function)
    return {name: options[path] for path, name in _flat_names(options, spellings).items()}


def _is_bool(annotation) -> bool:
    import typing

    return annotation is bool or (
        typing.get_origin(annotation) is typing.Union and set(typing.get_args(annotation)) == {bool, type(None)}
    )


def _is_list(annotation) -> bool:
    import typing

    return list in {typing.get_origin(annotation)} | {typing.get_origin(a) for a in typing.get_args(annotation)}


def bool_parameters(function) -> set[str]:
    """Options typed `bool` or `Optional[bool]` (flat names): the ones a bare `--flag` may switch on."""
    return {name for name, annotation in flat_options(function).items() if _is_bool(annotation)}


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
    names = {name for name, annotation in _parameter_types(function).items() if _is_list(annotation)}
    return _gather_lists(args, names | set(more_list_names))


def _gather_lists(args: list[str], list_names: set[str]) -> list[str]:
    import json

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


def _type_name(annotation) -> str:
    import typing

    if typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


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


def _read_yaml(path: str) -> dict:
    from pathlib import Path

    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    data.pop("yaml_config", None)  # the original's files may name themselves
    return data


class _Spelled:
    """The options of one grouped command, and where each value given came from (for error messages)."""

    def __init__(self, function):
        self.options, self.spellings = option_paths(function)
        self.flat = _flat_names(self.options, self.spellings)
        self.given: dict[str, tuple[str, object]] = {}  # path -> (where, value as given)

    def file_values(self, mapping: dict, where: str, prefix: str = "") -> dict:
        """A YAML mapping (flat keys, groups, or both) as {path: value}."""
        out = {}
        for key, value in mapping.items():
            spelled = f"{prefix}{key}"
            path = self.spellings.get(spelled)
            if path is not None and path not in self.options:  # a group: its keys below it
                if not isinstance(value, dict):
                    raise ValueError(f"{where}: key {spelled!r} is a group of keys; give it a mapping")
                out.update(self.file_values(value, where, f"{spelled}."))
            elif path is not None:
                out[path] = value
                self.given[path] = (where, value)
            else:
                raise ValueError(f"{where}: unknown key {spelled!r}{self.nearest(spelled)}")
        return out

    def command_line(self, args: list[str]) -> list[str]:
        """`--learning_rate 1e-4` -> `--run.optimization.learning_rate 1e-4`; bare flags and lists as everywhere."""
        out = []
        for i, arg in enumerate(args):
            if arg.startswith("--") and arg != "--help":
                key, equals, value = arg[2:].partition("=")
                plus = "+" if key.endswith("+") else ""
                path = self.spellings.get(key.rstrip("+"))
                if path is None:  # (a group's path passes: `--optimization F.yaml` is that group's own file)
                    raise ValueError(f"unknown option --{key.rstrip('+')}{self.nearest(key.rstrip('+'))}")
                following = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
                self.given[path] = ("command line", value if equals else following)
                arg = f"--{path}{plus}{equals}{value}"
            out.append(arg)
        out = bare_flags_true(out, {p for p, a in self.options.items() if _is_bool(a)})
        return _gather_lists(out, {p for p, a in self.options.items() if _is_list(a)})

    def nearest(self, name: str) -> str:
        """` (did you mean 'learning_rate'?)`: the closest option, spelled as `name` is (flat or grouped)."""
        import difflib

        options = [
            tail for tail, path in self.spellings.items() if path in self.options and tail.count(".") == name.count(".")
        ]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
        return f" (did you mean {close[0]!r}?)" if close else ""

    def explained(self, err: Exception) -> ValueError:
        """jsonargparse's error, with the key as the user spelled it and where its value came from."""
        import re

        found = re.search(r'Parser key "([^"]+)"', str(err))
        path = found.group(1) if found else None
        if path not in self.options:
            return ValueError(str(err).strip().replace("\n", " "))
        where, value = self.given.get(path, ("config", None))
        return ValueError(
            f"{where}: key {self.flat.get(path, path)!r} expects {_type_name(self.options[path])}, got {value!r}"
        )


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


def parse_grouped(name: str, function, args: list[str]) -> tuple[dict, bool]:
    """The arguments of a command whose signature has dataclass groups, from YAML file(s) then the
    command line, in flat or grouped spelling; and whether --print_config was asked for."""
    import yaml
    from jsonargparse import ArgumentError, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings are the --help
    files, rest, print_config = _split_config_args(args)
    spelled = _Spelled(function)
    from_files: dict = {}
    for file in files:
        from_files.update(spelled.file_values(_read_yaml(file), file))
    command_line = spelled.command_line(rest)
    description = (function.__doc__ or "").strip().split("\n")[0]
    parser = ArgumentParser(
        prog=f"bumblecore {name}",
        exit_on_error=False,
        description=(
            f"{description}\n\nKeys are shown by their flat names, as YAML files (key: value) and --print_config "
            "spell them; the grouped spelling works too (--optimization.learning_rate, or the whole path "
            "--run.optimization.learning_rate); --yaml_config F is --config F."
        ),
    )
    parser.add_argument(
        "--config", action="config", help="YAML file of flat (or grouped) keys; the command line overrides it"
    )
    parser.add_function_arguments(function, as_group=False)
    if any(arg in ("-h", "--help") for arg in command_line):
        print(flat_help(parser.format_help(), function), end="")
        raise SystemExit(0)
    nested: dict = {}
    for path, value in from_files.items():
        *groups, key = path.split(".")
        target = nested
        for group in groups:
            target = target.setdefault(group, {})
        target[key] = value
    try:
        parsed = parser.parse_args((["--config", yaml.safe_dump(nested)] if nested else []) + command_line)
    except ArgumentError as err:
        raise spelled.explained(err) from None
    arguments = parser.instantiate(parsed)
    return {key: arguments[key] for key in _parameter_types(function)}, print_config


def run_grouped_command(name: str, function, args: list[str]) -> None:
    import yaml

    arguments, print_config = parse_grouped(name, function, args)
    if print_config:  # flat, as training_args.yaml: users feed it back as a config
        print(yaml.safe_dump(flat_values(arguments), sort_keys=False, allow_unicode=True), end="")
        return
    function(**arguments)


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

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
        if option_groups(function):
            run_grouped_command(name, function, argv[1:])
        else:
            args = bare_flags_true(argv[1:], bool_parameters(function))
            CLI(function, args=gather_list_values(function, args), prog=f"bumblecore {name}", as_positional=False)
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
