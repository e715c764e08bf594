"""No folder of the repository passes for an installed package.

`python -c`, `python -m pytest`, a notebook opened at the root and `python benchmarks/x.py` each put a folder of the
repository first on the import path. A folder or module there named like an installed distribution's module would
be imported in its place: the `kernels/` folder once hid Hugging Face's `kernels` package from transformers.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders Python puts first on the import path: the root (`python -c`, `python -m`), and the folders of scripts.
PATH_FOLDERS = ["", "benchmarks", "examples", "tests", "tests/scripts"]
OWN_DISTRIBUTION = "ran-peft"

FIND_ORIGINS = """
import importlib.util, json, sys
origins = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    origins[name] = [spec.origin or ""] + list(spec.submodule_search_locations or []) if spec else []
print(json.dumps(origins))
"""


def _importable_names(folder: Path) -> set[str]:
    names = set()
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and entry.name.isidentifier():
            names.add(entry.name)  # a package, or a namespace portion
        elif entry.suffix in {".py", ".so", ".pyc"} and entry.stem.isidentifier():
            names.add(entry.stem)
    return names


def _within(path: Path, entries: list[Path]) -> bool:
    path = path.resolve()
    return any(path == entry.resolve() or path.is_relative_to(entry.resolve()) for entry in entries)


def _installed_modules() -> dict[str, list[str]]:
    return {
        module: distributions
        for module, distributions in importlib.metadata.packages_distributions().items()
        if OWN_DISTRIBUTION not in distributions and module.isidentifier()
    }


def shadowed_modules(root: Path = ROOT) -> dict[str, str]:
    """Installed modules that a process started in one of `root`'s path folders would import from the repository.

    Maps "folder: module" to the path it would be imported from.
    """
    installed = _installed_modules()
    found = {}
    for relative in PATH_FOLDERS:
        folder = root / relative
        candidates = sorted(_importable_names(folder) & installed.keys()) if folder.is_dir() else []
        if not candidates:
            continue
        done = subprocess.run(
            [sys.executable, "-c", FIND_ORIGINS, *candidates],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        for module, origins in json.loads(done.stdout).items():
            entries = [folder / module, folder / f"{module}.py"]  # the repository's own entry of that name
            inside = [origin for origin in origins if origin and _within(Path(origin), entries)]
            if inside:
                found[f"{relative or '.'}: {module} (from {', '.join(installed[module])})"] = inside[0]
    return found


def test_no_repository_folder_shadows_an_installed_module():
    shadowed = shadowed_modules()
    assert not shadowed, (
        f"these would be imported from the repository in place of the installed module: {shadowed}"
    )


def test_the_check_catches_a_folder_named_like_an_installed_module(tmp_path):
    installed = _installed_modules()
    name = "yaml" if "yaml" in installed else sorted(installed)[0]
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    shadowed = shadowed_modules(tmp_path)
    assert list(shadowed) == [f".: {name} (from {', '.join(installed[name])})"]
    assert Path(shadowed[list(shadowed)[0]]).parent.name == name


def test_the_kernels_folder_is_not_hugging_faces_kernels_from_the_root():
    if "kernels" not in _installed_modules():
        pytest.skip("Hugging Face's `kernels` is not installed here (transformers < 5.25 does not need it)")
    code = "import kernels, peft, transformers.modeling_utils, ran_peft, ran_peft.kernels.pgd; print(kernels.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not _within(Path(done.stdout.strip().splitlines()[-1]), [ROOT / "kernels"])


def test_the_stack_imports_from_the_repository_root():
    code = "import peft, transformers.modeling_utils, ran_peft; from ran_peft.kernels.rectify import rectification_kl"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_kernels_folder_refuses_to_run_under_another_name():
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('kernels.dispatch', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "try:\n    spec.loader.exec_module(module)\nexcept ImportError as error:\n    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "kernels" / "dispatch.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "imports as ran_peft.kernels.dispatch, not as kernels.dispatch" in done.stdout, done.stderr
