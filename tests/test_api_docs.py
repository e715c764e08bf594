"""The API reference is complete: every name in `ran_peft.__all__` (and every public function of the kernel modules)
has a docstring, so do the public methods of the public classes, and each name has its entry on an API page.

The docs site is built from these docstrings (`mkdocs build --strict` in `.ci/run`); mkdocstrings renders an
undocumented object as a bare signature without a warning, so this test is what fails on a missing docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import ran_peft

ROOT = Path(__file__).resolve().parents[1]
API_PAGES = ROOT / "docs" / "api"
KERNEL_MODULES = ("ran_peft.kernels.pgd", "ran_peft.kernels.rectify", "ran_peft.kernels.dispatch")


def _exported_from() -> dict[str, str]:
    """Name in `ran_peft.__all__` -> the module `ran_peft/__init__.py` imports it from."""
    tree = ast.parse((ROOT / "ran_peft" / "__init__.py").read_text())
    sources = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sources[alias.asname or alias.name] = node.module
    return sources


def attribute_docstring(module: ModuleType, name: str) -> str | None:
    """The string literal right after the module-level assignment of `name` (how griffe documents data)."""
    body = ast.parse(inspect.getsource(module)).body
    for statement in body:  # imported from a submodule (e.g. `ran_peft.noise` from `.captions`): look there
        if isinstance(statement, ast.ImportFrom) and any(
            (a.asname or a.name) == name for a in statement.names
        ):
            package = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
            source = importlib.import_module("." * statement.level + (statement.module or ""), package)
            return attribute_docstring(source, name)
    for statement, following in zip(body, body[1:], strict=False):
        targets = (
            statement.targets
            if isinstance(statement, ast.Assign)
            else [statement.target]
            if isinstance(statement, ast.AnnAssign)
            else []
        )
        if any(isinstance(target, ast.Name) and target.id == name for target in targets):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                return following.value.value if isinstance(following.value.value, str) else None
            return None
    return None


def _own_docstring(obj: Any) -> str:
    doc = obj.__doc__ or ""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""  # the signature dataclasses writes when a class has no docstring
    return doc.strip()


def _public_methods(cls: type) -> dict[str, Any]:
    """Public methods and properties defined in `cls`'s own body."""
    methods = {}
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        function = function.fget if isinstance(function, property) else function
        if inspect.isfunction(function) and function.__qualname__.split(".")[0] == cls.__name__:
            methods[name] = function
    return methods


def undocumented(objects: dict[str, Any], data_modules: dict[str, ModuleType]) -> list[str]:
    """Which of `objects` (name -> object) lack a docstring; data (constants) is looked up in `data_modules`.

    A method counts as documented when it or the method it overrides has a docstring.
    """
    missing = []
    for name, obj in objects.items():
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not _own_docstring(obj):
                missing.append(name)
            if inspect.isclass(obj):
                for method, function in _public_methods(obj).items():
                    inherited = any(
                        (getattr(getattr(base, method, None), "__doc__", None) or "").strip()
                        for base in obj.__mro__[1:]
                        if method in vars(base)
                    )
                    if not (function.__doc__ or "").strip() and not inherited:
                        missing.append(f"{name}.{method}")
        elif not attribute_docstring(data_modules[name], name):
            missing.append(name)
    return missing


def _kernel_objects() -> dict[str, Any]:
    objects = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        objects[module_name] = module
        for name, obj in vars(module).items():
            public = not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
            if public and obj.__module__ == module.__name__:
                objects[f"{module_name}.{name}"] = obj
    return objects


def test_every_public_name_has_a_docstring():
    sources = _exported_from()
    objects = {name: getattr(ran_peft, name) for name in ran_peft.__all__}
    data_modules = {name: importlib.import_module(sources[name]) for name in ran_peft.__all__}
    assert undocumented(objects, data_modules) == []


def test_every_kernel_function_has_a_docstring():
    objects = _kernel_objects()
    missing = [name for name, obj in objects.items() if not (obj.__doc__ or "").strip()]
    assert missing == []


def test_the_check_names_what_lacks_a_docstring(tmp_path, monkeypatch):
    source = (
        "from dataclasses import dataclass\n"
        "LIMIT = 3\n"
        "DOCUMENTED = 4\n"
        '"""What it is."""\n'
        "def bare():\n    pass\n"
        "@dataclass\nclass Record:\n    value: int = 0\n"
        "class Base:\n"
        '    """A base."""\n'
        "    def run(self):\n"
        '        """Runs."""\n'
        "class Child(Base):\n"
        '    """A child."""\n'
        "    def run(self):\n        pass\n"
        "    def extra(self):\n        pass\n"
        "    @property\n    def size(self):\n        return 1\n"
    )
    (tmp_path / "sample_module.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("sample_module")
    names = ("LIMIT", "DOCUMENTED", "bare", "Record", "Child")
    missing = undocumented({name: getattr(module, name) for name in names}, dict.fromkeys(names, module))
    assert missing == ["LIMIT", "bare", "Record", "Child.extra", "Child.size"]


def api_page_entries() -> set[str]:
    """The objects the API pages render (`::: ran_peft.Name` or `::: ran_peft.module.Name`), and the members listed
    under a module's `members:` option."""
    entries = set()
    for page in API_PAGES.glob("*.md"):
        current = None
        for line in page.read_text().splitlines():
            if match := re.match(r"^::: ([\w.]+)\s*$", line):
                current = match.group(1)
                entries.add(current)
            elif current and (member := re.match(r"^\s+- (\w+)\s*$", line)):
                entries.add(f"{current}.{member.group(1)}")
    return entries


def test_every_public_name_is_on_an_api_page():
    entries = api_page_entries()
    shown = {entry.rsplit(".", 1)[-1] for entry in entries if entry.startswith("ran_peft.")}
    missing = [name for name in ran_peft.__all__ if name not in shown]
    assert missing == [], f"add `::: ran_peft.<name>` to a page in docs/api/ for: {missing}"
    # each entry names something that exists (mkdocs would also fail, this says which page)
    for entry in entries:
        module_name, _, attribute = entry.rpartition(".")
        try:
            importlib.import_module(entry)
        except ImportError:
            assert hasattr(importlib.import_module(module_name), attribute), entry
    assert set(KERNEL_MODULES) <= entries


@pytest.mark.parametrize("page", sorted(p.name for p in API_PAGES.glob("*.md")))
def test_api_pages_are_in_the_site_navigation(page):
    assert f"api/{page}" in (ROOT / "mkdocs.yml").read_text()
