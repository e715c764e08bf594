"""The Python snippets of the README and the guides in docs/ run, as written, on tiny offline models.

Each ```python block is one test. A Hub model a snippet loads (`from_pretrained("owner/name")`) is replaced by a tiny
random model of the same architecture, saved locally (`HUB_STAND_INS`); a snippet naming a Hub model that has no
stand-in fails, so no snippet can reach for the network. A block that must not run here (a Hub push, an optional
dependency CI's main environment lacks) is marked on the line before it with `<!-- snippet: skip (the reason) -->`,
and the marking stays rare. The README's two-line snippet runs in a fresh process, whose stderr must not hold
bitsandbytes' notice about its `kernels-community` Hub kernel.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"^<!-- snippet: skip \((?P<reason>.+)\) -->$")
HUB_MODEL = re.compile(r"""from_pretrained\(\s*["'](?P<name>[\w.-]+/[\w.-]+)["']""")
TWO_LINES_HEADING = "## Two lines from LoRA to RAN"


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None
    heading: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def snippets(path: Path) -> list[Snippet]:
    """The ```python blocks of a markdown file, with the skip mark of the line before each."""
    found, lines = [], path.read_text().splitlines()
    heading, index = "", 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            heading = line
        elif line.strip().startswith("```"):  # a fence: python blocks are collected, others skipped whole
            end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
            if line.strip() == "```python":
                previous = lines[index - 1].strip() if index else ""
                mark = SKIP.match(previous)
                code = "\n".join(lines[index + 1 : end]) + "\n"
                found.append(Snippet(path, index + 1, code, mark.group("reason") if mark else None, heading))
            index = end
        index += 1
    return found


ALL = [snippet for document in DOCUMENTS for snippet in snippets(document)]
TWO_LINES = [s for s in ALL if s.path.name == "README.md" and s.heading == TWO_LINES_HEADING]
IN_PROCESS = [s for s in ALL if s not in TWO_LINES]


@pytest.fixture(scope="module")
def hub_stand_ins(tmp_path_factory) -> dict[str, Path]:
    """Hub id -> a local folder with a tiny random model of that architecture and a working processor."""
    from transformers import CLIPModel

    from ran_peft.pretrain import build_tiny_llava, offline_processor, small_clip_config

    clip = tmp_path_factory.mktemp("tiny-clip")
    processor = offline_processor(image_size=32)
    torch.manual_seed(0)
    CLIPModel(small_clip_config(processor.tokenizer, image_size=32, width=32)).save_pretrained(clip)
    processor.save_pretrained(clip)
    return {
        "openai/clip-vit-base-patch32": clip,
        "llava-hf/llava-1.5-7b-hf": build_tiny_llava(extra_words=["Which organ is shown?"]),
    }


def with_stand_ins(snippet: Snippet, stand_ins: dict[str, Path]) -> str:
    code = snippet.code
    for match in HUB_MODEL.finditer(code):
        assert match.group("name") in stand_ins, (
            f"{snippet.name} loads the Hub model {match.group('name')!r}: add a tiny stand-in to "
            "tests/test_doc_snippets.py (tests never download)."
        )
    for name, folder in stand_ins.items():
        code = code.replace(f'"{name}"', repr(str(folder)))
    return code


def test_the_documents_hold_snippets_and_few_skip_marks():
    assert TWO_LINES, f"the README has no ```python block under {TWO_LINES_HEADING!r}"
    assert len(ALL) >= 10
    skipped = [s.name for s in ALL if s.skip]
    assert len(skipped) <= 3, f"skip marks should stay rare: {skipped}"


def test_the_collector_reads_blocks_and_skip_marks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n```python\nx = 1\n```\n\n```bash\n# a comment\n```\n"
        "<!-- snippet: skip (needs the network) -->\n```python\n# not a heading\nupload()\n```\n"
    )
    first, second = snippets(page)
    assert (first.line, first.code, first.skip) == (3, "x = 1\n", None)
    assert (second.line, second.code, second.skip) == (11, "# not a heading\nupload()\n", "needs the network")
    assert second.heading == "# Page"  # a comment in a code block is no heading


def test_a_snippet_naming_a_hub_model_without_a_stand_in_fails():
    snippet = Snippet(ROOT / "README.md", 1, 'CLIPModel.from_pretrained("someone/huge-model")\n', None, "")
    with pytest.raises(AssertionError, match="someone/huge-model"):
        with_stand_ins(snippet, {})


@pytest.mark.parametrize("snippet", IN_PROCESS, ids=lambda s: s.name)
def test_snippet_runs(snippet, hub_stand_ins, tmp_path, monkeypatch):
    if snippet.skip:
        pytest.skip(snippet.skip)
    code = with_stand_ins(snippet, hub_stand_ins)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, snippet.name, "exec"), {"__name__": "__snippet__"})


def _run_in_fresh_process(code: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=environment, timeout=600
    )


def test_the_readme_two_line_snippet_trains_and_shows_no_hub_kernel_notice(hub_stand_ins, tmp_path):
    (snippet,) = TWO_LINES
    assert snippet.code.startswith("import ran_peft"), (
        "the README imports ran_peft before peft (see its comment)"
    )
    result = _run_in_fresh_process(with_stand_ins(snippet, hub_stand_ins), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "kernels-community" not in result.stderr, result.stderr[-4000:]
    saved = {path.name for path in (tmp_path / "my-ran-adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "ran_config.json"} <= saved


def test_without_ran_peft_first_the_notice_the_readme_avoids_is_shown(tmp_path):
    # The check above can fail: importing bitsandbytes without ran_peft's filter shows the notice, on CPUs where
    # bitsandbytes tries the Hub kernel (AVX512-BF16) and Hugging Face's `kernels` is installed.
    from bitsandbytes.functional import has_avx512bf16

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed: bitsandbytes gives no Hub-kernel notice here")
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes gives no Hub-kernel notice here")
    result = _run_in_fresh_process("import bitsandbytes", tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "kernels-community" in result.stderr


LINK = re.compile(r"\]\((?!https?://)(?P<target>[^)#\s]*)(?:#(?P<anchor>[^)\s]+))?\)")


def _slug(heading: str) -> str:
    """The anchor mkdocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.lstrip("#").strip().lower())
    return re.sub(r"[\s]+", "-", text)


def test_the_readmes_links_point_at_files_and_headings():
    # mkdocs checks the guides' links (`mkdocs build --strict`); the README is not part of the site.
    broken = []
    for match in LINK.finditer((ROOT / "README.md").read_text()):
        target = ROOT / match.group("target") if match.group("target") else ROOT / "README.md"
        if not target.exists():
            broken.append(match.group(0))
        elif match.group("anchor") and target.suffix == ".md":
            headings = [_slug(line) for line in target.read_text().splitlines() if line.startswith("#")]
            if match.group("anchor") not in headings:
                broken.append(match.group(0))
    assert broken == []
    assert _slug("## Step cost and memory on a generative VLM") == "step-cost-and-memory-on-a-generative-vlm"
