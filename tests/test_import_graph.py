"""No module of `ran_peft` imports, directly or through others, a module that imports it back.

The graph is read from the source with `ast`: every import counts, those inside functions too (a lazy import is
still a circle, only a slower one to notice), except those under `if TYPE_CHECKING:`. `ran_peft.kernels` is a link
to the repository's `kernels/` folder and is read through it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_files(package_dir: Path, package: str) -> dict[str, Path]:
    """Module name -> source file, for every `.py` file under `package_dir` (links to folders followed)."""
    files = {}
    for path in sorted(package_dir.iterdir()):
        name = path.stem if path.suffix == ".py" else path.name
        if path.is_dir() and name.isidentifier():
            files.update(_module_files(path, f"{package}.{name}"))
        elif path.suffix == ".py":
            files[package if name == "__init__" else f"{package}.{name}"] = path
    # A folder without `__init__.py` (ran_peft.kernels) is still a (namespace) package its modules import from.
    return files


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    return skipped


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (anywhere in its source)."""
    files = _module_files(package_dir, package)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skipped = _type_checking_nodes(tree)
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    source = ".".join([*parts, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                for alias in node.names:  # `from package import submodule` imports the submodule
                    targets.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source)
        graph[module] = {target for target in targets if target in files and target != module}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module, as a circle `a -> b -> ... -> a`."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [_circle_through(graph, set(group)) for group in groups]


def _circle_through(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """One import path that starts and ends at the group's first module, staying inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        module = frontier.pop(0)
        for target in sorted(graph[module] & group):
            if target == start:
                return [*paths[module], start]
            if target not in paths:
                paths[target] = [*paths[module], target]
                frontier.append(target)
    raise AssertionError(f"no circle through {sorted(group)}")


def test_ran_peft_has_no_import_circle():
    graph = import_graph(ROOT / "ran_peft", "ran_peft")
    assert {"ran_peft.families", "ran_peft.open_clip", "ran_peft.kernels.pgd"} <= graph.keys()
    assert "ran_peft.kernels.dispatch" in graph["ran_peft.kernels.pgd"]  # relative imports are read
    circles = import_circles(graph)
    assert not circles, "import circles: " + "; ".join(" -> ".join(circle) for circle in circles)


def test_the_check_finds_a_circle_made_by_a_lazy_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    graph = import_graph(package, "pkg")
    assert import_circles(graph) == []  # an import for type checkers only is no circle
    (package / "c.py").write_text("def g():\n    import pkg.a\n")
    assert import_circles(import_graph(package, "pkg")) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_open_clip_models_are_recognised_when_only_the_families_module_is_imported():
    # open_clip's detector registers itself; `ran_peft.families` no longer imports `ran_peft.open_clip`.
    code = (
        "import torch\n"
        "from torch import nn\n"
        "from ran_peft.families import detect_family\n"
        "class OpenCLIPShaped(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.visual = nn.Linear(4, 2)\n"
        "        self.visual.preprocess_cfg = {'mean': (0.5, 0.5, 0.5), 'std': (0.2, 0.2, 0.2)}\n"
        "        self.logit_scale = nn.Parameter(torch.zeros(()))\n"
        "    def encode_image(self, image, normalize=False):\n"
        "        return self.visual(image)\n"
        "    def encode_text(self, text, normalize=False):\n"
        "        return text\n"
        "    def forward(self, image=None, text=None):\n"
        "        return self.encode_image(image), self.encode_text(text), self.logit_scale.exp()\n"
        "print(type(detect_family(OpenCLIPShaped())).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "OpenCLIPFamily"
