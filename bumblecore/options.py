"""A command's options and the spellings users write for them: the one edge between what users type
and the grouped schema that jsonargparse parses (cli.py).

A parameter typed with a dataclass is a group of options (a dataclass field typed with a dataclass is a
group within it): train's `run: TrainArgs` has the option `run.optimization.learning_rate`. Users name
an option by any dotted tail of its path (`learning_rate`, `optimization.learning_rate`, the whole
path) or by an older name its group lists in `aliases` (`label_smoothing`), in YAML files and on the
command line alike. On the command line a boolean alone means true (`--packing`), a list takes
space-separated values, and `--yaml_config F` (the original's spelling) is `--config F`. Help and
errors name each key as users write it.
"""

from __future__ import annotations

import dataclasses
import typing


def _hints(owner) -> dict[str, object]:
    """Annotations of a function's parameters or a dataclass's fields, postponed (string) ones resolved."""
    try:
        return typing.get_type_hints(owner)
    except (NameError, TypeError):  # a name only imported for type checkers: keep the raw annotations
        return dict(getattr(owner, "__annotations__", {}))


def _alternatives(annotation) -> set:
    """`Optional[list[str]]` -> {list[str], NoneType}; a type that is not a union -> itself."""
    return set(typing.get_args(annotation)) if typing.get_origin(annotation) is typing.Union else {annotation}


def is_bool(annotation) -> bool:
    """`bool` or `Optional[bool]`: an option that a bare `--flag` switches on."""
    return _alternatives(annotation) - {type(None)} == {bool}


def is_list(annotation) -> bool:
    return any(typing.get_origin(alternative) is list for alternative in _alternatives(annotation))


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _read_yaml(file: str) -> dict:
    from pathlib import Path

    import yaml

    if not Path(file).is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    try:
        data = yaml.safe_load(Path(file).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{file}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a mapping of keys, got {type(data).__name__}")
    data.pop("yaml_config", None)  # the original's files may name themselves
    return data


class Options:
    """The options of one command: each one's path and type, and every spelling of an option or group."""

    def __init__(self, function):
        import inspect

        hints = _hints(function)
        self.parameters = {
            name: hints.get(name, parameter.annotation)
            for name, parameter in inspect.signature(function).parameters.items()
        }
        self.types: dict[str, object] = {}  # option path -> its annotation
        self.paths: dict[str, str] = {}  # spelling -> the path of the option or group it names
        self.given: dict[str, tuple[str, str, object]] = {}  # path -> (where, spelling, value) as the user gave it
        self.replaced: set[str] = set()  # paths the command line sets (not `--key+`): the files' values are unread
        ambiguous = set()

        def spell(path: str, target: str) -> None:
            parts = path.split(".")
            for i in range(len(parts)):
                tail = ".".join(parts[i:])
                if self.paths.setdefault(tail, target) != target:
                    ambiguous.add(tail)  # two options end alike: only a longer spelling names either

        def add(path: str, annotation) -> None:
            spell(path, path)
            if not (isinstance(annotation, type) and dataclasses.is_dataclass(annotation)):
                self.types[path] = annotation
                return
            fields = _hints(annotation)
            for field in dataclasses.fields(annotation):
                add(f"{path}.{field.name}", fields.get(field.name, field.type))
            for old, new in getattr(annotation, "aliases", {}).items():
                spell(f"{path}.{old}", f"{path}.{new}")

        for name, annotation in self.parameters.items():
            add(name, annotation)
        self.paths = {tail: path for tail, path in self.paths.items() if tail not in ambiguous}
        self.groups = set(self.paths.values()) - set(self.types)

    def flat(self, path: str) -> str:
        """An option's (or group's) flat name: its shortest spelling, the field name unless another ends alike."""
        parts = path.split(".")
        tails = [".".join(parts[i:]) for i in reversed(range(len(parts)))]
        return next((tail for tail in tails if self.paths.get(tail) == path), path)

    def command_line(self, args: list[str]) -> tuple[list[str], list[str], bool]:
        """(config files, the command line by grouped paths, whether --print_config was given):
        `--learning_rate 1e-4` -> `--run.optimization.learning_rate 1e-4`; a boolean alone (last, or before
        another option) -> `true`; a list's space-separated values -> one JSON list (`null` alone: none)."""
        import json

        files, out, print_config, i = [], [], False, 0
        while i < len(args):
            arg, values = args[i], []
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                values.append(args[i])
                i += 1
            key, equals, value = arg[2:].partition("=")
            name = key.rstrip("+")  # `--key+ value` appends to a list (jsonargparse)
            if not arg.startswith("--") or arg == "--help":
                out += [arg, *values]
            elif name in ("config", "yaml_config"):
                if not (equals or values):
                    raise ValueError(f"{arg} needs a file")
                files += [value] if equals else values
            elif arg == "--print_config":
                print_config = True
                out += values
            elif name not in self.paths:
                raise ValueError(f"unknown option --{name}{self.nearest(name)}")
            else:
                path = self.paths[name]
                self.given[path] = ("command line", name, value if equals else next(iter(values), None))
                if key == name:
                    self.replaced.add(path)
                option = f"--{path}{key[len(name) :]}"
                annotation = self.types.get(path)  # none for a group: `--optimization F.yaml` is its own file
                if equals:
                    out += [f"{option}={value}", *values]
                elif is_bool(annotation) and not values:
                    out += [option, "true"]
                elif is_list(annotation) and len(values) == 1 and values[0].lstrip().startswith("["):
                    out += [option, values[0]]  # already a list literal
                elif is_list(annotation) and len(values) == 1 and values[0].strip().lower() in ("null", "none", ""):
                    out += [option, "null"]  # no list (--eval_dataset_path null), not a file named null
                elif is_list(annotation):
                    out += [option, json.dumps(values)]
                else:
                    out += [option, *values]
        return files, out, print_config

    def from_files(self, files: list[str]) -> dict:
        """The YAML files' values (flat or grouped keys; a later file over an earlier one), nested by path:
        what jsonargparse reads as one config. Called after `command_line`, whose keys win."""
        nested, given = {}, {}
        for file in files:
            for path, value in self._mapping(_read_yaml(file), file, given).items():
                *groups, key = path.split(".")
                target = nested
                for group in groups:
                    target = target.setdefault(group, {})
                target[key] = value
        self.given = {**given, **self.given}  # a value from the command line wins over the files' (`--key+`)
        return nested

    def _mapping(self, mapping: dict, where: str, given: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in mapping.items():
            spelled = f"{prefix}{key}"
            path = self.paths.get(spelled)
            if path is None:
                raise ValueError(f"{where}: unknown key {spelled!r}{self.nearest(spelled)}")
            if path in self.replaced:
                continue
            if path in self.types:
                out[path] = value
                given[path] = (where, spelled, value)
            elif isinstance(value, dict):  # a group: its keys below it
                out.update(self._mapping(value, where, given, f"{spelled}."))
            else:
                raise ValueError(f"{where}: key {spelled!r} is a group of keys; give it a mapping")
        return out

    def nearest(self, name: str) -> str:
        """` (did you mean 'learning_rate'?)`: the closest option, spelled as `name` is (flat or grouped)."""
        import difflib

        spellings = [
            tail for tail, path in self.paths.items() if path in self.types and tail.count(".") == name.count(".")
        ]
        close = difflib.get_close_matches(name, spellings, n=1, cutoff=0.5)
        return f" (did you mean {close[0]!r}?)" if close else ""

    def flat_help(self, text: str) -> str:
        """jsonargparse's help with every option and group under its flat name (`--learning_rate`, not
        `--run.optimization.learning_rate`): what users type, and what YAML files and --print_config write."""
        import re

        for path in sorted(set(self.paths.values()), key=len, reverse=True):
            text = re.sub(rf"--{re.escape(path)}(?=[\s\],=+]|$)", f"--{self.flat(path)}", text)
        return text

    def explained(self, err: Exception) -> ValueError:
        """jsonargparse's error in one line, naming the key as the user spelled it and where its value came from."""
        import re

        found = re.search(r'Parser key "([^"]+)"', str(err))
        path = found.group(1) if found else None
        if path not in self.types:
            return ValueError(str(err).strip().replace("\n", " "))
        where, spelled, value = self.given.get(path, ("config", self.flat(path), None))
        return ValueError(f"{where}: key {spelled!r} expects {_type_name(self.types[path])}, got {value!r}")
