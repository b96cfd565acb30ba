"""The house keeps its shape: imports point down (function-level imports included) in the package order and the
floors the README states, each file of a shards or run directory is composed into a path by its one owner, and no
function grows past 60 lines."""

import ast
import re
from functools import cache

from helpers import ROOT

PACKAGES = ("pile_tools", "tokenizer", "trainer")  # each may import only those before it (and itself)
# A directory's own files, and the one module that reads and writes each: no other composes its path.
OWNERS = {
    "blend.json": "pile_tools.shards_dir",
    "manifest.json": "pile_tools.shards_dir",
    "plan.json": "pile_tools.shards_dir",
    "latest": "pile_tools.rundir",
    "checksums.json": "pile_tools.checksums",
}


@cache
def modules() -> dict[str, ast.Module]:
    """Every module of the project by its dotted name (packages' __init__ by the package's), parsed."""
    found = {"cli": ast.parse((ROOT / "cli.py").read_text())}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = ast.parse(path.read_text())
    return found


def imported(tree: ast.Module) -> set[str]:
    """The project's modules a module imports, wherever the import statement is (inside functions too)."""
    names = set(modules())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        out |= {t for t in targets if t in names}
    return out


@cache
def graph() -> dict[str, set[str]]:
    return {name: imported(tree) - {name} for name, tree in modules().items()}


def floors() -> dict[str, int]:
    """Each module's floor: one above the highest it imports; an AssertionError names any circle."""
    edges, floor = graph(), {}

    def of(name: str, path: tuple[str, ...] = ()) -> int:
        assert name not in path, f"an import circle: {' -> '.join((*path, name))}"
        if name not in floor:
            floor[name] = 1 + max((of(m, (*path, name)) for m in edges[name]), default=-1)
        return floor[name]

    for name in edges:
        of(name)
    return floor


def package_of(name: str) -> str:
    return name.split(".")[0]


def test_no_module_imports_in_a_circle():
    floors()


def test_each_package_imports_only_the_packages_below_it():
    order = {package: i for i, package in enumerate(PACKAGES)} | {"cli": len(PACKAGES)}
    upward = [
        f"{name} imports {other}"
        for name, others in graph().items()
        for other in others
        if order[package_of(other)] > order[package_of(name)]
    ]
    assert upward == []


def readme_floors() -> dict[str, int]:
    """The floors the README's Layout states, one line per floor: `N  package: module, module   package/x.py`."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("Imports point down") :].split("```")[1]
    stated = {}
    for line in block.strip().splitlines():
        number, _, rest = line.strip().partition(" ")
        for group in re.split(r"\s{3,}", rest.strip()):
            package, _, names = group.partition(":")
            if not names:  # a single module: pile_tools/ground.py, cli.py
                stated[group.removesuffix(".py").replace("/", ".")] = int(number)
                continue
            for module in names.split(","):
                stated[f"{package.strip()}.{module.strip()}"] = int(number)
    return stated


def test_the_readme_states_every_modules_floor():
    computed = {name: f for name, f in floors().items() if name not in PACKAGES}  # the packages' empty __init__s
    assert readme_floors() == computed


def owner_constants() -> dict[str, dict[str, str]]:
    """The names each owner module gives its files: {module: {constant: file name}}."""
    out: dict[str, dict[str, str]] = {}
    for owner in set(OWNERS.values()):
        for node in ast.walk(modules()[owner]):
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Constant, ast.Tuple)):
                targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
                values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
                for target, value in zip(targets, values):
                    if isinstance(value, ast.Constant) and value.value in OWNERS and isinstance(target, ast.Name):
                        out.setdefault(owner, {})[target.id] = value.value
    return out


def composed_files(name: str, tree: ast.Module) -> set[str]:
    """The directory files a module composes into a path: `DIR / "blend.json"`, `DIR / BLEND` (a constant it
    imported from the owner), or a string ending in "/blend.json"."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in owner_constants():
            for alias in node.names:
                if alias.name in owner_constants()[node.module]:
                    aliases[alias.asname or alias.name] = owner_constants()[node.module][alias.name]
    if name in owner_constants():
        aliases |= owner_constants()[name]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right
            if isinstance(right, ast.Constant) and right.value in OWNERS:
                found.add(right.value)
            elif isinstance(right, ast.Name) and right.id in aliases:
                found.add(aliases[right.id])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= {f for f in OWNERS if node.value.endswith("/" + f)}
    return found


def test_each_directory_file_has_one_owner():
    strangers = [
        f"{name} composes the path of {file} (its owner: {OWNERS[file]})"
        for name, tree in modules().items()
        for file in composed_files(name, tree)
        if OWNERS[file] != name
    ]
    assert strangers == []
    assert all(composed_files(owner, modules()[owner]) for owner in set(OWNERS.values()))  # the scan sees them


def test_one_verify_checkpoint_and_no_function_over_60_lines():
    functions = [
        (name, node)
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    assert [name for name, node in functions if node.name == "verify_checkpoint"] == ["trainer.checkpoint"]
    long = [
        f"{name}.{n.name}: {n.end_lineno - n.lineno + 1} lines"
        for name, n in functions
        if n.end_lineno - n.lineno >= 60
    ]
    assert long == []
