"""The package's layers import only downward (docs/ARCHITECTURE.md, "Layers"): every `bumblecore.*`
import in every module, at the top or inside a function, is checked against the table."""

import ast
from pathlib import Path

import bumblecore

PACKAGE = Path(bumblecore.__file__).parent

# layer -> the layers its modules may import (itself always allowed)
MAY_IMPORT = {
    "args": set(),
    "chat": {"args"},
    "tokenizer": {"args", "chat"},
    "data": {"args", "tokenizer", "chat"},
    "model": {"args", "tokenizer", "chat"},
    "inference": {"args", "tokenizer", "data", "chat", "model"},
    # GRPO's rollouts are the inference engine's generation (never a second decode loop)
    "train": {"args", "tokenizer", "data", "chat", "model", "inference"},
    # a stage's one module (bumblecore/recipes/): its records, its Stage, its extra models
    "recipes": {"args", "tokenizer", "data", "chat", "model", "inference", "train"},
    # the commands that run a stage through its recipe: train/run.py, data/commands.py
    "commands": {"args", "tokenizer", "data", "chat", "model", "inference", "train", "recipes"},
    "top": {"args", "tokenizer", "data", "chat", "model", "train", "inference", "recipes", "commands"},
}
COMMANDS = (["train", "run"], ["data", "commands"])  # modules of their own layer, like chat/format.py


def layer_of(name: str) -> str:
    """`bumblecore.train.engine` -> train; chat/format.py is its own layer (tokenizer and model use it);
    data/dataset_spec.py (what a data key names, checked when settings are parsed) belongs to the settings."""
    parts = name.split(".")[1:]
    if parts[:2] == ["data", "dataset_spec"]:
        return "args"
    if parts[:2] in COMMANDS:
        return "commands"
    head = parts[0] if parts else ""
    return head if head in MAY_IMPORT else "top"


def imported_modules(file: Path):
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_layers_import_only_downward():
    violations = []
    for file in sorted(PACKAGE.rglob("*.py")):
        module = "bumblecore." + ".".join(file.relative_to(PACKAGE).with_suffix("").parts)
        layer = layer_of(module)
        for line, name in imported_modules(file):
            if not name.startswith("bumblecore.") or layer == "top":
                continue
            target = layer_of(name)
            if target != layer and target not in MAY_IMPORT[layer]:
                violations.append(f"{file.relative_to(PACKAGE.parent)}:{line}: {layer} imports {name} ({target})")
    assert not violations, "\n".join(violations)


def test_the_table_knows_every_folder():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    assert folders <= set(MAY_IMPORT), folders - set(MAY_IMPORT)


def module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_among_modules():
    """Within a layer too: no module reaches itself through `bumblecore.*` imports (inside functions count)."""
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph = {}
    for module, file in files.items():
        targets = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from bumblecore.model import bumblebee` imports the submodule, else the module named
                targets |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module for a in node.names
                }
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[module] = {t for t in targets if t in files and t != module}
    cycles = []
    for start in graph:  # depth-first from each module: a path back to it is a cycle
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for target in graph[module]:
                if target == start:
                    cycles.append(" -> ".join(path + [start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_no_package_module_outgrows_one_reading():
    """Issue 30's bound: a module reads in one sitting (450 lines); the model file, which reads top to
    bottom as a reference, may take 600."""
    limits = {"model/bumblebee.py": 600}
    over = [
        f"{path}: {lines} lines"
        for file in sorted(PACKAGE.rglob("*.py"))
        for path, lines in [(file.relative_to(PACKAGE).as_posix(), len(file.read_text(encoding="utf-8").splitlines()))]
        if lines > limits.get(path, 450)
    ]
    assert not over, "\n".join(over)
