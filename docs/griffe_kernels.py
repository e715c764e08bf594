"""A griffe extension for the API reference: `ran_peft.kernels` has no `__init__.py` on purpose (it must never pass
for Hugging Face's `kernels` package), so griffe does not see it as part of `ran_peft`; this loads its modules
statically from the link's folder and attaches them as `ran_peft.kernels.<module>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import griffe


class RanPeftKernels(griffe.Extension):
    """Attach `ran_peft/kernels/*.py` to the `ran_peft` package griffe loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.path != "ran_peft" or "kernels" in pkg.members:
            return
        folder = Path(pkg.filepath).parent / "kernels"
        kernels = griffe.Module("kernels", filepath=folder, parent=pkg)
        kernels.docstring = griffe.Docstring(
            "Fused Triton kernels beside their PyTorch references (no `__init__.py`: import the modules by name).",
            parent=kernels,
        )
        pkg.set_member("kernels", kernels)
        for path in sorted(folder.glob("*.py")):
            module = griffe.visit(
                path.stem,
                filepath=path,
                code=path.read_text(),
                parent=kernels,
                extensions=loader.extensions,
                docstring_parser=loader.docstring_parser,
                docstring_options=loader.docstring_options,
                lines_collection=loader.lines_collection,
                modules_collection=loader.modules_collection,
            )
            kernels.set_member(path.stem, module)
