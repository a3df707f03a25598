"""The import check: the package's module graph, read from the source with ``ast`` (top-level and function-local
imports, relative imports resolved), must have

(a) no import cycle (a cycle closed only through function-local imports counts too: it is the same tangle, hidden);
(b) nothing in ``av2ts_cli/model/`` importing outside torch, timm, numpy, scipy, the standard library,
    ``av2ts_cli.config`` and ``av2ts_cli.model`` itself: the network stands alone (docs/architecture.md);
(c) the AVSBench contract constants (and their aliases) given a value only in ``av2ts_cli/avsbench.py``; importing
    and re-exporting them is fine;
(d) a ``# local: <why>`` comment on every function-local import of an av2ts_cli module or a heavy third-party
    package (on its line, on a comment line right above it, or above the block of imports it opens): such imports
    exist only where start-up time needs them, and say so;
(e) rooms (a top-level module or a subpackage of ``av2ts_cli`` is one room) that import each other in no circle, in
    at most ``MAX_FLOORS`` floors, function-local imports counted;
(f) no file over 500 lines unless the first line of its docstring says why (``past 500 lines``);
(g) every module placed in the layout of docs/architecture.md.

Each check is a function over a source folder, so the negative tests below feed it a tiny synthetic package and
show that it fails.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "av2ts_cli"
NETWORK_ALLOWED_THIRD_PARTY = {"torch", "timm", "numpy", "scipy"}
CONTRACT_HOME = "av2ts_cli.avsbench"
CONTRACT_NAMES = {"SAMPLE_RATE", "FRAME_OFFSET", "IGNORE_INDEX", "EXAMPLE_SECONDS", "EXAMPLE_FRAMES", "MEL_BANDS",
                  "SUBSET_CLASSES", "EXAMPLE_SPAN", "SUBSETS"}
CONTRACT_ALIASES = {"AUDIO_SAMPLE_RATE", "NUM_MEL_BANDS", "SAMPLE_OFFSET", "FALLBACK_OFFSET"}
# Third-party packages whose import costs tens of milliseconds or more (measured with python -X importtime on the
# 2-core machine: torch 1-2 s, timm ~1 s, moviepy 1 s, scipy 0.4 s, cv2 0.2 s, numpy 0.2 s, ffmpeg-python and
# imageio-ffmpeg 0.1 s, huggingface_hub and PIL.Image 35-40 ms); a function-local import of one must say why.
HEAVY_THIRD_PARTY = {"torch", "torchaudio", "torchvision", "timm", "numpy", "scipy", "cv2", "PIL", "moviepy",
                     "huggingface_hub", "safetensors", "imageio_ffmpeg", "ffmpeg", "pycocotools", "transformers",
                     "matplotlib"}
LOCAL_MARK = "# local:"
MAX_FLOORS = 10  # floors of the room graph (docs/architecture.md, "Rooms and floors")
MAX_LINES = 500
LONG_FILE_MARK = "past 500 lines"  # in the first line of the docstring of a longer file, with the reason
ARCHITECTURE = ROOT / "docs" / "architecture.md"


# ----------------------------------------------------------------------------------------------- reading imports
@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. av2ts_cli.model.ops.build
    target: str  # the absolute module imported; for ``from P import m`` the submodule P.m when that is a module
    path: Path
    line: int
    end_line: int
    local: bool  # inside a function
    type_checking: bool  # under ``if TYPE_CHECKING:`` (never executed)


def module_names(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of every .py file of ``root/package``."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <node.module> import ...``, relative imports resolved against ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def read_imports(root: Path, package: str) -> list[Import]:
    """Every import statement of the package, each target it names (one row per module)."""
    modules = module_names(root, package)
    found: list[Import] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        _visit(tree, module, path, modules, found, local=False, type_checking=False)
    return found


def _visit(node: ast.AST, module: str, path: Path, modules: dict[str, Path], found: list[Import], local: bool,
           type_checking: bool) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            else:
                source = _resolve(module, path.name == "__init__.py", child)
                submodules = [f"{source}.{alias.name}" for alias in child.names if f"{source}.{alias.name}" in modules]
                named = len(submodules) < len(child.names)  # some names are attributes of the source
                targets = submodules + ([source] if named else [])
            for target in targets:
                found.append(Import(module, target, path, child.lineno, child.end_lineno or child.lineno, local,
                                    type_checking))
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            _visit(child, module, path, modules, found, True, type_checking)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.body:
                _visit(ast.Module(body=[statement], type_ignores=[]), module, path, modules, found, local, True)
            for statement in child.orelse:
                _visit(ast.Module(body=[statement], type_ignores=[]), module, path, modules, found, local,
                       type_checking)
        else:
            _visit(child, module, path, modules, found, local, type_checking)


# ------------------------------------------------------------------------------------------------------ checks
def find_cycles(imports: list[Import], package: str) -> list[list[Import]]:
    """One import cycle (as the chain of import statements that closes it) per strongly connected group of the
    package's modules; empty when there is none. Imports under ``if TYPE_CHECKING:`` never run and do not count."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.type_checking or not (imp.target == package or imp.target.startswith(package + ".")):
            continue
        if imp.target != imp.module:
            edges.setdefault(imp.module, {}).setdefault(imp.target, imp)
    # Tarjan's strongly connected components, iteratively (no recursion limit on a large package)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(group)
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, {})))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    cycles = []
    for group in groups:  # a shortest path back to the group's first module, through the group only
        first = min(group)
        paths = {first: []}
        queue = [first]
        while queue:
            node = queue.pop(0)
            for target, imp in sorted(edges.get(node, {}).items()):
                if target == first:
                    cycles.append(paths[node] + [imp])
                    queue = []
                    break
                if target in group and target not in paths:
                    paths[target] = paths[node] + [imp]
                    queue.append(target)
    return cycles


def describe_cycle(cycle: list[Import], root: Path) -> str:
    """``a -> b -> c -> a  [pkg/a.py:1, pkg/b.py:2 (local), pkg/c.py:1]``: the modules and the statements."""
    chain = " -> ".join([cycle[0].module] + [imp.target for imp in cycle])
    where = ", ".join(f"{imp.path.relative_to(root).as_posix()}:{imp.line}{' (local)' if imp.local else ''}"
                      for imp in cycle)
    return f"{chain}  [{where}]"


def forbidden_network_imports(imports: list[Import], package: str, network: str, allowed: set[str]) -> list[Import]:
    """Imports in ``network`` (a subpackage of ``package``) of anything but the standard library, the ``allowed``
    third-party packages, ``allowed`` modules of the package and the network itself."""
    bad = []
    for imp in imports:
        if not (imp.module == network or imp.module.startswith(network + ".")):
            continue
        top = imp.target.split(".")[0]
        if imp.target == network or imp.target.startswith(network + "."):
            continue
        if top == package:
            if imp.target not in allowed:
                bad.append(imp)
        elif top not in sys.stdlib_module_names and top not in allowed and top != "__future__":
            bad.append(imp)
    return bad


def _assigned_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Tuple | ast.List):
        return [name for element in target.elts for name in _assigned_names(element)]
    return []


def contract_definitions(root: Path, package: str, names: set[str]) -> dict[str, list[str]]:
    """{name: ["module:line", ...]} for each assignment that gives one of ``names`` a value of its own (anything
    but a plain reference to another name, ``X = other.X``, which is a re-export)."""
    found: dict[str, list[str]] = {}
    for module, path in module_names(root, package).items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign | ast.AugAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            if isinstance(value, ast.Name | ast.Attribute):
                continue
            for target in targets:
                for name in _assigned_names(target):
                    if name in names:
                        found.setdefault(name, []).append(f"{module}:{node.lineno}")
    return found


def unexplained_local_imports(imports: list[Import], package: str, heavy: set[str]) -> list[Import]:
    """Function-local imports of the package's modules or of ``heavy`` packages without a ``# local:`` comment on
    their lines or in the comment lines right above; an import right below an explained one (no blank line between)
    shares its reason."""
    bad = []
    lines_of: dict[Path, list[str]] = {}
    explained: dict[tuple[Path, int], bool] = {}

    def is_explained(imp: Import) -> bool:
        lines = lines_of.setdefault(imp.path, imp.path.read_text().splitlines())
        own = lines[imp.line - 1:imp.end_line]
        if any(LOCAL_MARK in line for line in own):
            return True
        k = imp.line - 2  # the comment lines right above (a reason may take two lines)
        while k >= 0 and lines[k].strip().startswith("#"):
            if LOCAL_MARK in lines[k]:
                return True
            k -= 1
        return explained.get((imp.path, imp.line - 1), False)  # the import statement on the line above

    for imp in sorted(imports, key=lambda i: (str(i.path), i.line)):
        if not imp.local:
            continue
        key = (imp.path, imp.end_line)
        if key not in explained:
            explained[key] = is_explained(imp)
        top = imp.target.split(".")[0]
        if (top == package or top in heavy) and not explained[key]:
            bad.append(imp)
    return bad


def _where(imp: Import, root: Path) -> str:
    return f"{imp.path.relative_to(root).as_posix()}:{imp.line} imports {imp.target}"


def room_of(module: str, package: str) -> str | None:
    """The room of a module: ``pkg.media`` -> ``media``, ``pkg.predict.stream`` -> ``predict``; the package's own
    ``__init__`` and ``__main__`` stand apart (None and ``__main__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def room_graph(imports: list[Import], package: str) -> dict[str, set[str]]:
    """{room: the other rooms it imports}, function-local imports included, ``TYPE_CHECKING`` ones not."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.type_checking or not imp.target.startswith(package + "."):
            continue
        source, target = room_of(imp.module, package), room_of(imp.target, package)
        if source is None or target is None:
            continue
        graph.setdefault(source, set())
        graph.setdefault(target, set())
        if source != target:
            graph[source].add(target)
    return graph


def room_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each group of rooms that reach one another (sorted), empty when the room graph has no circle."""
    circles = []
    reach = {room: _reachable(graph, room) for room in graph}
    seen: set[str] = set()
    for room in sorted(graph):
        if room in seen:
            continue
        group = sorted(other for other in graph if other == room or (other in reach[room] and room in reach[other]))
        seen.update(group)
        if len(group) > 1:
            circles.append(group)
    return circles


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    found, todo = set(), list(graph[start])
    while todo:
        room = todo.pop()
        if room not in found:
            found.add(room)
            todo.extend(graph.get(room, ()))
    return found


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """{room: its floor}: 0 for a room that imports no other, else one above the highest room it imports (the
    graph must have no circle)."""
    floor: dict[str, int] = {}

    def of(room: str) -> int:
        if room not in floor:
            floor[room] = 1 + max((of(below) for below in graph[room]), default=-1)
        return floor[room]

    for room in graph:
        of(room)
    return floor


def long_files(root: Path, package: str, limit: int = MAX_LINES, mark: str = LONG_FILE_MARK) -> list[str]:
    """Files over ``limit`` lines whose docstring's first line does not say why (``mark``)."""
    bad = []
    for path in module_names(root, package).values():
        text = path.read_text()
        if text.count("\n") <= limit:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if mark not in doc.split("\n", 1)[0]:
            bad.append(f"{path.relative_to(root).as_posix()}: {text.count(chr(10))} lines")
    return bad


def layout_paths(doc: str) -> set[str]:
    """The module paths (``media.py``, ``predict/stream.py``) that the first ``text`` block under "## Layout" of an
    architecture page places: a ``name/`` token opens a folder for the lines indented below it, and every
    ``*.py`` token of a line belongs to the innermost folder opened above it at a smaller indent."""
    section = doc.split("## Layout", 1)[1]
    block = section.split("```text", 1)[1].split("```", 1)[0]
    paths: set[str] = set()
    stack: list[tuple[int, str]] = []  # (indent, folder path)
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        base = stack[-1][1] if stack else ""
        words = line.split("  ")  # names are separated by two spaces from each other and from the description
        for word in (w.strip() for w in words if w.strip()):
            if word.endswith(".py") and " " not in word:
                paths.add(base + word)
            elif word.endswith("/") and " " not in word and word[:-1].replace("_", "").replace("/", "").isalnum():
                stack.append((indent, base + word))
            else:
                break  # the description
    return paths


def unplaced_modules(root: Path, package: str, doc: str) -> list[str]:
    """Modules of the package that the layout does not place (the package's top folder is the layout's root)."""
    placed = layout_paths(doc)
    missing = []
    for path in module_names(root, package).values():
        relative = path.relative_to(root / package).as_posix()
        if relative not in placed and f"{package}/{relative}" not in placed:
            missing.append(relative)
    return sorted(missing)


# ------------------------------------------------------------------------------------------- the real package
@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return read_imports(ROOT, PACKAGE)


def test_the_reader_sees_top_level_local_and_relative_imports(imports):
    assert len({imp.module for imp in imports}) > 30
    targets = {(imp.module, imp.target, imp.local) for imp in imports}
    assert ("av2ts_cli.model.pixel_decoder", "av2ts_cli.model.ops", False) in targets
    assert ("av2ts_cli.model.ops.deform_attn", "av2ts_cli.model.ops.build", False) in targets  # from P import m
    assert any(imp.local for imp in imports) and any(not imp.local for imp in imports)


def test_no_import_cycle(imports):
    cycles = find_cycles(imports, PACKAGE)
    assert not cycles, "import cycles:\n" + "\n".join(describe_cycle(c, ROOT) for c in cycles)


def test_the_network_imports_only_torch_timm_numpy_scipy_stdlib_config_and_itself(imports):
    bad = forbidden_network_imports(imports, PACKAGE, f"{PACKAGE}.model",
                                    NETWORK_ALLOWED_THIRD_PARTY | {f"{PACKAGE}.config"})
    assert not bad, "\n".join(_where(imp, ROOT) for imp in bad)


def test_the_contract_constants_are_defined_only_in_avsbench():
    found = contract_definitions(ROOT, PACKAGE, CONTRACT_NAMES | CONTRACT_ALIASES)
    home = {name: places for name, places in found.items()}
    for name in CONTRACT_NAMES:  # each defined exactly once, in its home
        assert [p.rsplit(":", 1)[0] for p in home.get(name, [])].count(CONTRACT_HOME) == 1, name
    elsewhere = sorted(f"{place}: {name}" for name, places in found.items() for place in places
                       if place.rsplit(":", 1)[0] != CONTRACT_HOME)
    assert not elsewhere, "defined outside avsbench.py:\n" + "\n".join(elsewhere)


def test_every_local_import_of_the_package_or_a_heavy_package_says_why(imports):
    bad = unexplained_local_imports(imports, PACKAGE, HEAVY_THIRD_PARTY)
    assert not bad, f"function-local imports without a '{LOCAL_MARK} <why>' comment:\n" + "\n".join(
        _where(imp, ROOT) for imp in bad)


def test_the_rooms_import_each_other_in_no_circle_and_at_most_ten_floors(imports):
    graph = room_graph(imports, PACKAGE)
    assert {"predict", "weights", "model", "data", "cli"} <= graph.keys()
    circles = room_circles(graph)
    assert not circles, f"rooms in a circle: {circles}"
    floor = floors(graph)
    assert max(floor.values()) + 1 <= MAX_FLOORS, sorted(floor.items(), key=lambda item: item[1])


def test_no_file_is_over_500_lines_without_a_reason():
    bad = long_files(ROOT, PACKAGE)
    assert not bad, f"over {MAX_LINES} lines without '{LONG_FILE_MARK}: <why>' in the docstring's first line:\n" + \
        "\n".join(bad)


def test_every_module_is_placed_in_the_architecture_page():
    missing = unplaced_modules(ROOT, PACKAGE, ARCHITECTURE.read_text())
    assert not missing, f"modules missing from the layout of {ARCHITECTURE.name}: {missing}"


# ------------------------------------------------------------------------------- the checks fail where they must
def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_through_a_function_local_and_a_relative_import_is_found(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "def f():\n    from .sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": "import pkg.a\n",
        "d.py": "from pkg import a, b\n",  # into the cycle, not part of it
    })
    cycles = find_cycles(read_imports(root, "pkg"), "pkg")
    assert len(cycles) == 1
    assert describe_cycle(cycles[0], root) == ("pkg.a -> pkg.b -> pkg.sub.c -> pkg.a  "
                                               "[pkg/a.py:1, pkg/b.py:2 (local), pkg/sub/c.py:1]")
    assert [imp.local for imp in cycles[0]] == [False, True, False]


def test_type_checking_imports_and_a_package_importing_its_submodules_are_no_cycle(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "ops/__init__.py": "from pkg.ops.op import run\nfrom pkg.ops.build import load\n",
        "ops/op.py": "from pkg.ops import build\ndef run():\n    return build.load()\n",
        "ops/build.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.ops.op import run\n"
                        "def load():\n    return 1\n",
    })
    assert find_cycles(read_imports(root, "pkg"), "pkg") == []


def test_forbidden_network_imports_are_named(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "config.py": "",
        "console.py": "",
        "net/__init__.py": "from pkg.net.layer import Layer\nfrom pkg.config import X\n",
        "net/layer.py": "import os, json\nimport torch.nn\nfrom . import helpers\nfrom .. import console\n"
                        "def warn():\n    import rich\n    from pkg.errors import UsageError\n",
        "net/helpers.py": "import numpy as np\nfrom scipy.optimize import linear_sum_assignment\n",
    })
    bad = forbidden_network_imports(read_imports(root, "pkg"), "pkg", "pkg.net",
                                    NETWORK_ALLOWED_THIRD_PARTY | {"pkg.config"})
    assert sorted((imp.module, imp.target, imp.line) for imp in bad) == [
        ("pkg.net.layer", "pkg.console", 4), ("pkg.net.layer", "pkg.errors", 7), ("pkg.net.layer", "rich", 6)]


def test_contract_constants_defined_twice_are_found(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "contract.py": "SAMPLE_RATE = 16000\nFRAME_OFFSET = 15 / 16\n",
        "media.py": "from pkg.contract import SAMPLE_RATE\nAUDIO_SAMPLE_RATE = SAMPLE_RATE\n",  # re-exports: fine
        "render.py": "FALLBACK_OFFSET = 15 / 16\nclass Grid:\n    SAMPLE_RATE: int = 16_000\n",
        "scene.py": "NUM_MEL_BANDS, OTHER = 64, 1\n",
    })
    found = contract_definitions(root, "pkg", CONTRACT_NAMES | CONTRACT_ALIASES)
    assert found == {"SAMPLE_RATE": ["pkg.contract:1", "pkg.render:3"], "FRAME_OFFSET": ["pkg.contract:2"],
                     "FALLBACK_OFFSET": ["pkg.render:1"], "NUM_MEL_BANDS": ["pkg.scene:1"]}


def test_local_imports_without_a_reason_are_found(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "tools.py": "",
        "app.py": (
            "def a():\n"
            "    import torch  # local: 2 s, only this command\n"           # 2: explained on its line
            "    import timm\n"                                            # 3: in the block below it
            "\n"
            "    from pkg import tools\n"                                  # 5: a new block, no reason
            "def b():\n"
            "    # local: loads the network, which takes\n"
            "    # seconds\n"
            "    from pkg.tools import (\n"                                # 9: comment lines above
            "        x,\n"
            "    )\n"
            "    import json\n"                                            # 12: stdlib: needs none
            "    import numpy\n"                                           # 13: same block as 9 (no blank line)
            "def c():\n"
            "    import rich\n"                                            # 15: light third party: needs none
            "    from . import tools  # local:\n"                          # 16: explained
            "    # a comment without the mark\n"
            "    import torch\n"                                           # 18: not explained
        ),
    })
    bad = unexplained_local_imports(read_imports(root, "pkg"), "pkg", HEAVY_THIRD_PARTY)
    assert sorted(imp.line for imp in bad) == [5, 18]


def test_a_circle_between_rooms_and_the_floors_are_found(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "base.py": "",
        "media.py": "from pkg import base\n",
        "data/__init__.py": "",
        "data/audio.py": "from pkg import environment\n",  # data -> environment
        "environment.py": "from pkg.weights import resolve\n",  # environment -> weights
        "weights/__init__.py": "",
        "weights/resolve.py": "def f():\n    from pkg.data import audio\n",  # weights -> data (local): a circle
        "cli.py": "from pkg import media, weights\n",
    })
    graph = room_graph(read_imports(root, "pkg"), "pkg")
    assert room_circles(graph) == [["data", "environment", "weights"]]
    # the same modules as one room each with no circle: floors counted from the ground
    (root / "pkg" / "data" / "audio.py").write_text("from pkg import base\n")
    graph = room_graph(read_imports(root, "pkg"), "pkg")
    assert room_circles(graph) == []
    assert floors(graph) == {"base": 0, "media": 1, "data": 1, "weights": 2, "environment": 3, "cli": 3}


def test_a_long_file_needs_its_reason_in_the_first_docstring_line(tmp_path):
    body = "x = 1\n" * 30
    root = _package(tmp_path, {
        "__init__.py": "",
        "short.py": '"""Short."""\nx = 1\n',
        "long.py": '"""Long, with no reason given.\n\npast 500 lines on a later line does not count."""\n' + body,
        "reasoned.py": '"""Reasoned; past 500 lines: one parser for the whole format."""\n' + body,
    })
    assert long_files(root, "pkg", limit=20) == ["pkg/long.py: 33 lines"]


def test_the_layout_places_modules_by_their_folders():
    doc = ("# A\n\n## Layout\n\n```text\nREADME.md   the readme\npkg/\n  errors.py  media.py   ground floor\n"
           "  predict/   the verb\n    runner.py   the batch\n    stream.py\n  model/   the network\n"
           "    ops/deform_attn.py   the op\n  cli.py   the app\n```\n\n## Other\n```text\nlost.py\n```\n")
    assert layout_paths(doc) == {"pkg/errors.py", "pkg/media.py", "pkg/predict/runner.py", "pkg/predict/stream.py",
                                 "pkg/model/ops/deform_attn.py", "pkg/cli.py"}
