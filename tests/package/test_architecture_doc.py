"""docs/ARCHITECTURE.md's map stays true: in its "Layers", "Where to change what", "Add a stage" and
"Add a model family" sections every backticked path is a file of the repository, every `module.name`
is defined in that module, every `Class.attribute` in that class, every other backticked name somewhere
in the package, every test is named by its path (tests/<part>/test_*.py) and exists, and every doc
named exists. The oracle is the repository itself: the files on disk and the names the package's source
defines."""

import ast
import keyword
import re
from pathlib import Path

import bumblecore

PACKAGE = Path(bumblecore.__file__).parent
REPO = PACKAGE.parent
DOC = REPO / "docs" / "ARCHITECTURE.md"
SECTIONS = ("Layers", "Where to change what", "Add a stage", "Add a model family")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


def defined_names(tree: ast.AST) -> set[str]:
    """Functions, classes, assigned names, dataclass fields and whole-identifier strings (a format's or a
    key's name: `unpaired_prompt`) defined anywhere in a module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and IDENTIFIER.fullmatch(node.value):
            names.add(node.value)
    return names


MODULES = {file: ast.parse(file.read_text(encoding="utf-8")) for file in sorted(PACKAGE.rglob("*.py"))}
EVERY_NAME = set().union(*map(defined_names, MODULES.values())) | {file.stem for file in MODULES}
CLASSES = {
    node.name: defined_names(node)
    for tree in MODULES.values()
    for node in ast.walk(tree)
    if isinstance(node, ast.ClassDef)
}


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def module_file(dotted: str):
    """`cli`, `recipes`, `data/adapters`, `model.hf_io`, a module's own name (`hf_io`) or a test module
    (`test_layers`) -> its file."""
    path = dotted.replace(".", "/")
    tests = (REPO / "tests").rglob(f"{path}.py") if path.startswith("test_") else ()
    for candidate in (PACKAGE / f"{path}.py", PACKAGE / path / "__init__.py", *tests):
        if candidate.is_file():
            return candidate
    by_name = [file for file in MODULES if file.stem == path]
    return by_name[0] if len(by_name) == 1 else None


def file_exists(path: str) -> bool:
    """A path as the doc writes it: from the repository root, the package, or a bare file name."""
    if (REPO / path).exists() or (PACKAGE / path).exists():
        return True
    return "/" not in path and any(REPO.glob(f"bumblecore/**/{path}"))


def problem(token: str):
    """Why a backticked token names nothing that exists, or None (also for commands and placeholders)."""
    token = token.split("(")[0]  # `GenerationEngine(prefix_cache_mb=)`, `count(batch)`
    if not token or " " in token or "<" in token or token.startswith("-") or keyword.iskeyword(token):
        return None
    if re.search(r"\.(py|json|md|yaml)$", token) or ("/" in token and "." not in token):
        return None if file_exists(token) else "no such file"
    if not IDENTIFIER.fullmatch(re.sub(r"[./]", "_", token)):
        return None  # an operator or a value (`==`, `1e-4`)
    if "." not in token:
        return None if token in EVERY_NAME else "defined nowhere in the package"
    owner, name = token.rsplit(".", 1)  # `cli.COMMANDS`, `data/adapters.ADAPTERS`, `TrainArgs._check_kto`
    file = module_file(owner)
    if file is not None:
        tree = MODULES.get(file) or ast.parse(file.read_text(encoding="utf-8"))
        return None if name in defined_names(tree) else f"not defined in {file.relative_to(REPO)}"
    if owner in CLASSES:
        return None if name in CLASSES[owner] else f"class {owner} has no {name}"
    return f"{owner} is neither a module nor a class of the package"


def problems(text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for token in re.findall(r"`([^`]+)`", line):
            why = problem(token.strip())
            if why:
                found.append(f"line {number}: `{token}`: {why}")
        unquoted = re.sub(r"`[^`]*`", "", line)
        # A test is named by its path: tests/ mirrors the package, so the path is where a newcomer looks.
        for test_file in re.findall(r"(?<![\w/])((?:[\w.]+/)*test_\w+\.py)\b", unquoted):
            if not test_file.startswith("tests/"):
                found.append(f"line {number}: {test_file}: name the test by its path (tests/<part>/test_*.py)")
            elif not (REPO / test_file).is_file():
                found.append(f"line {number}: {test_file}: no such test file")
        for doc in re.findall(r"\b((?:docs/)?[A-Z_]+\.md)\b", unquoted):
            if not (REPO / doc).is_file() and not (REPO / "docs" / doc).is_file():
                found.append(f"line {number}: {doc}: no such doc")
    return found


def test_the_check_finds_what_does_not_exist():
    text = (
        "| a row | `train/run.py`, `train/nowhere.py`, `cli.COMMANDS`, `cli.NO_TABLE`, `TrainArgs._check_kto`, "
        "`TrainArgs._check_nothing`, `Recipe`, `NoSuchRecipe`, `bumblecore <cmd> --help` | tests/package/test_cli.py, "
        "tests/train/test_nothing.py, tests/test_cli.py, test_engine.py, docs/NOWHERE.md |"
    )
    assert [entry.split(": ")[1] for entry in problems(text)] == [
        "`train/nowhere.py`",
        "`cli.NO_TABLE`",
        "`TrainArgs._check_nothing`",
        "`NoSuchRecipe`",
        "tests/train/test_nothing.py",
        "tests/test_cli.py",
        "test_engine.py",
        "docs/NOWHERE.md",
    ]


def test_every_path_and_name_the_map_gives_exists():
    text = DOC.read_text(encoding="utf-8")
    for title in SECTIONS:
        body = section(text, title)
        assert body.count("`") > 20, f"section {title!r} names nothing: the check would pass on anything"
        missing = problems(body)
        assert not missing, f"docs/ARCHITECTURE.md, {title!r}:\n" + "\n".join(missing)
