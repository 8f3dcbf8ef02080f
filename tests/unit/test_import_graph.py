"""No import loop inside any package folder of moe_dist (a static check: nothing is imported).

For each folder (moe_dist itself, moe_dist/models, moe_dist/moe, ...) the graph has one node per module
file of that folder (``__init__`` included) and an edge A -> B when A imports B anywhere: at module level,
inside a function or class, or under ``if TYPE_CHECKING:``; relative (``from .b import x``, ``from . import b``)
or absolute (``import moe_dist.pkg.b``, ``from moe_dist.pkg import b``). Importing a name the folder's
``__init__`` defines or re-exports (``from . import name``, ``from moe_dist.pkg import name``) is an edge to
``__init__``, which imports its submodules in turn. Imports of other folders (subpackages included) are
not edges: each folder is checked on its own.

A type named in an annotation without being imported (``def forward(self, out: ModelOutput)`` under
``from __future__ import annotations``, the sibling that defines it never imported) is an edge as well: the
dependency is real, only hidden, and must not hide a loop. ``test_annotations_name_imported_types`` asks
for the import outright.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "moe_dist"
# {importing module: {imported module of the same folder: where, "moe_dist/pkg/file.py:line"}}
Edges = Dict[str, Dict[str, str]]


def package_folders(package: Path = PACKAGE) -> List[Path]:
    """``package`` and every folder below it holding an ``__init__.py``."""
    return sorted(p.parent for p in package.rglob("__init__.py") if "__pycache__" not in p.parts)


def _dotted(folder: Path, package: Path) -> str:
    return ".".join((package.name,) + folder.relative_to(package).parts)


def _parse(folder: Path) -> Dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in sorted(folder.glob("*.py"))}


def import_graph(folder: Path, package: Path = PACKAGE, annotations: bool = True) -> Edges:
    """{module: {imported module of the same folder: "file:line" of the first such import}}. With
    ``annotations``, a type a module names in an annotation without importing it (``annotation_only``) is an
    edge too: the dependency is there, only hidden."""
    name = _dotted(folder, package)
    trees = _parse(folder)
    modules = set(trees)
    graph: Edges = {m: {} for m in sorted(modules)}
    for module, tree in trees.items():
        where = (folder / f"{module}.py").relative_to(package.parent)
        for node in ast.walk(tree):
            for target in _targets(node, name, modules):
                if target != module:  # the package __init__ importing names of its own
                    graph[module].setdefault(target, f"{where}:{node.lineno}")
        if annotations:
            for target, (ident, line) in annotation_only(trees, module).items():
                graph[module].setdefault(target, f"{where}:{line}, {ident!r} named in an annotation, not imported")
    return graph


def _bound(tree: ast.Module) -> Set[str]:
    """Every name ``tree`` binds anywhere (imports, defs, classes, assignments, arguments)."""
    names: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _top_level(tree: ast.Module) -> Set[str]:
    names: Set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def _annotation_names(tree: ast.Module):
    """(name, line) of every bare name in an annotation, string annotations ("Foo", "List[Foo]") parsed."""
    annotations = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            annotations += [a.annotation for a in args.posonlyargs + args.args + args.kwonlyargs
                            + [args.vararg, args.kwarg] if a is not None and a.annotation is not None]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    for annotation in filter(None, annotations):
        for node in ast.walk(annotation):
            if isinstance(node, ast.Name):
                yield node.id, node.lineno
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                try:
                    inner = ast.parse(node.value, mode="eval")
                except SyntaxError:
                    continue
                yield from ((n.id, node.lineno) for n in ast.walk(inner) if isinstance(n, ast.Name))


def annotation_only(trees: Dict[str, ast.Module], module: str) -> Dict[str, Tuple[str, int]]:
    """{sibling module: (name, line)}: names ``module`` uses in annotations, binds nowhere, and a sibling
    module of the same folder defines at top level (``__init__`` aside: it defines nothing of its own here)."""
    bound = _bound(trees[module]) | set(dir(builtins))
    found: Dict[str, Tuple[str, int]] = {}
    for ident, line in _annotation_names(trees[module]):
        if ident in bound:
            continue
        for other, tree in sorted(trees.items()):
            if other not in (module, "__init__") and ident in _top_level(tree):
                found.setdefault(other, (ident, line))
    return found


def _targets(node: ast.AST, package: str, modules: Set[str]) -> List[str]:
    """The modules of ``package`` (a folder's dotted name) that one import statement in it loads."""
    if isinstance(node, ast.Import):
        return [t for alias in node.names for t in _module_of(alias.name, package, modules, ())]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        # relative to the importing module's package (a folder's __init__ is that package itself)
        base = package.split(".")
        if node.level > 1:
            base = base[:-(node.level - 1)]
        if not base:
            return []
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return _module_of(source, package, modules, [alias.name for alias in node.names])


def _module_of(source: str, package: str, modules: Set[str], names) -> List[str]:
    """``from source import names`` (or ``import source``) as modules of ``package``."""
    if any(f"{source}.{n}" == package for n in names):  # from <parent> import <this package>
        return ["__init__"]
    if source == package:  # the package: a submodule by name, else a name of its __init__
        found = [n for n in names if n in modules and n != "__init__"]
        if len(found) < len(names) or not names:
            found.append("__init__")
        return found
    if source.startswith(package + "."):
        head = source[len(package) + 1:].split(".")[0]
        if head in modules:
            return [head]
        # a subpackage (its own folder), or a module that does not exist: loading it runs our __init__ first,
        # which the importing module (already loaded below __init__) does not need to wait for
    return []


def find_cycle(graph: Edges, within: Optional[Set[str]] = None) -> Optional[List[str]]:
    """One import loop as [a, b, ..., a] (among the modules ``within``, default all), or None.
    Deterministic: the first in sorted DFS order."""
    nodes = set(graph) if within is None else within
    state: Dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(set(graph.get(node, {})) & nodes):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(nodes):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def loop_groups(graph: Edges) -> List[List[str]]:
    """The groups of modules that import each other, directly or not (strongly connected components)."""
    reach = {m: _reachable(graph, m) for m in graph}
    groups = {frozenset(m2 for m2 in reach[m] if m in reach[m2]) for m in graph}
    return sorted(sorted(group) for group in groups if group)


def find_cycles(graph: Edges) -> List[List[str]]:
    """One loop per group of modules that import each other."""
    return [find_cycle(graph, set(group)) for group in loop_groups(graph)]


def _reachable(graph: Edges, start: str) -> Set[str]:
    """Modules ``start`` imports directly or indirectly (``start`` itself only through a loop)."""
    seen: Set[str] = set()
    todo = list(graph.get(start, {}))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, {}))
    return seen


def describe(cycle: List[str], graph: Edges) -> str:
    return " -> ".join(cycle) + "\n" + "\n".join(
        f"    {a} -> {b}  ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


FOLDERS = package_folders()


def test_every_package_folder_is_checked():
    names = {_dotted(f, PACKAGE) for f in FOLDERS}
    expected = {"moe_dist"} | {f"moe_dist.{n}" for n in ("moe", "models", "evaluation", "engine", "data", "cli",
                                                          "planner", "generation", "distributed", "text")}
    assert expected <= names, f"package folders not found: {sorted(expected - names)}"


@pytest.mark.parametrize("folder", FOLDERS, ids=[_dotted(f, PACKAGE) for f in FOLDERS])
def test_no_import_loop_in_folder(folder: Path):
    graph = import_graph(folder)
    groups = loop_groups(graph)
    assert not groups, f"import loops in {folder.relative_to(ROOT)}:\n" + "\n".join(
        f"  {', '.join(g)} import each other, e.g. " + describe(find_cycle(graph, set(g)), graph) for g in groups)


@pytest.mark.parametrize("folder", FOLDERS, ids=[_dotted(f, PACKAGE) for f in FOLDERS])
def test_annotations_name_imported_types(folder: Path):
    """A type named in an annotation is imported: a dependency no import shows cannot hide a loop."""
    trees = _parse(folder)
    hidden = {f"{folder.relative_to(ROOT)}/{module}.py:{line}: {ident!r} (defined in {other}.py)"
              for module in trees for other, (ident, line) in annotation_only(trees, module).items()}
    assert not hidden, "named in annotations, not imported:\n    " + "\n    ".join(sorted(hidden))


# ------------------------------------------------------------------------------------ the checker itself
def _write(root: Path, files: Dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "moe_dist"


def _loop_in(tmp_path: Path, files: Dict[str, str], folder: str = "pkg") -> Tuple[Optional[List[str]], Edges]:
    package = _write(tmp_path, {"moe_dist/__init__.py": "", f"moe_dist/{folder}/__init__.py": "", **files})
    graph = import_graph(package / folder, package)
    return find_cycle(graph), graph


def test_checker_finds_a_two_module_loop(tmp_path):
    cycle, graph = _loop_in(tmp_path, {
        "moe_dist/pkg/a.py": "from .b import B\nA = 1\n",
        "moe_dist/pkg/b.py": "def f():\n    from moe_dist.pkg.a import A\n    return A\nB = 2\n",
    })
    assert cycle == ["a", "b", "a"]
    assert "moe_dist/pkg/b.py:2" in describe(cycle, graph)


@pytest.mark.parametrize("a_imports", [
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
    "import moe_dist.pkg.b\n",
    "from moe_dist.pkg import b\n",
    "from . import b as other\n",
    "class C:\n    def m(self):\n        from . import b\n",
])
def test_checker_sees_every_form_of_import(tmp_path, a_imports):
    cycle, _ = _loop_in(tmp_path, {"moe_dist/pkg/a.py": a_imports, "moe_dist/pkg/b.py": "from .a import *\n"})
    assert cycle == ["a", "b", "a"]


@pytest.mark.parametrize("b_imports", ["def f():\n    from . import A\n", "import moe_dist.pkg\n",
                                       "from .. import pkg\n", "from moe_dist.pkg import A\n"])
def test_checker_resolves_the_package_init(tmp_path, b_imports):
    # b takes its own package (a name its __init__ re-exports from a): b -> __init__ -> a -> b
    cycle, _ = _loop_in(tmp_path, {
        "moe_dist/pkg/__init__.py": "from .a import A\n",
        "moe_dist/pkg/a.py": "from .b import B\nA = 1\n",
        "moe_dist/pkg/b.py": b_imports + "B = 2\n",
    })
    assert cycle == ["__init__", "a", "b", "__init__"]


def test_checker_ignores_other_folders_and_one_way_imports(tmp_path):
    cycle, graph = _loop_in(tmp_path, {
        "moe_dist/pkg/__init__.py": "from .a import A\nfrom .b import B\n",
        "moe_dist/pkg/a.py": "from .b import B\nfrom ..other import a\nfrom .sub import thing\nA = 1\n",
        "moe_dist/pkg/b.py": "import moe_dist.other.b\nfrom .. import other\nB = 2\n",
        "moe_dist/pkg/sub/__init__.py": "from ..a import A\n",
    })
    assert cycle is None
    assert graph == {"__init__": {"a": "moe_dist/pkg/__init__.py:1", "b": "moe_dist/pkg/__init__.py:2"},
                     "a": {"b": "moe_dist/pkg/a.py:1"}, "b": {}}


def test_checker_reports_each_loop(tmp_path):
    imports = {"a": "b", "b": "a", "c": "d, a", "d": "c", "e": "a, c"}  # loops a-b and c-d; e imports both
    _, graph = _loop_in(tmp_path, {f"moe_dist/pkg/{m}.py": f"from . import {names}\n" for m, names in imports.items()})
    assert find_cycles(graph) == [["a", "b", "a"], ["c", "d", "c"]]
    assert loop_groups(graph) == [["a", "b"], ["c", "d"]]


def test_checker_sees_types_named_in_annotations_only(tmp_path):
    # the dodge: a names b's type in annotations (string or postponed) without importing it, b imports a
    files = {"moe_dist/pkg/a.py": "from __future__ import annotations\n\n\ndef f(out: Out) -> 'List[Out]':\n"
                                  "    return [out]\n",
             "moe_dist/pkg/b.py": "from .a import f\n\n\nclass Out:\n    pass\n"}
    cycle, graph = _loop_in(tmp_path, files)
    assert cycle == ["a", "b", "a"]
    assert graph["a"]["b"] == "moe_dist/pkg/a.py:4, 'Out' named in an annotation, not imported"
    package = tmp_path / "moe_dist"
    assert annotation_only(_parse(package / "pkg"), "a") == {"b": ("Out", 4)}
    # imported (anywhere in a, even under TYPE_CHECKING), it is an ordinary import edge and the same loop
    files["moe_dist/pkg/a.py"] = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import Out\n" \
                                 "def f(out: Out) -> Out:\n    return out\n"
    cycle, graph = _loop_in(tmp_path, files)
    assert cycle == ["a", "b", "a"] and graph["a"]["b"] == "moe_dist/pkg/a.py:3"
    assert annotation_only(_parse(package / "pkg"), "a") == {}
    # names bound in the module itself (a parameter, a local class, a builtin) are nobody else's
    files["moe_dist/pkg/a.py"] = "class Out:\n    pass\n\n\ndef f(x: Out, n: int) -> Out:\n    return x\n"
    cycle, graph = _loop_in(tmp_path, files)
    assert cycle is None and graph["a"] == {}


def test_checker_checks_the_root_folder(tmp_path):
    package = _write(tmp_path, {"moe_dist/__init__.py": "", "moe_dist/x.py": "from . import y\n",
                                "moe_dist/y.py": "from .x import f\n", "moe_dist/pkg/__init__.py": ""})
    assert [_dotted(f, package) for f in package_folders(package)] == ["moe_dist", "moe_dist.pkg"]
    assert find_cycle(import_graph(package, package)) == ["x", "y", "x"]
