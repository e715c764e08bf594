"""Write `docs/models.md` and the README's model table from the registry sweep's outcomes, or check them.

The sweep (`tests/test_registry_sweep.py`) writes its outcomes as JSON when run with `RAN_MODELS_OUTCOMES=path`:

    RAN_MODELS_OUTCOMES=outputs/models_outcomes.json python -m pytest -q tests/test_registry_sweep.py
    python docs/gen_models_table.py outputs/models_outcomes.json           # write docs/models.md and README
    python docs/gen_models_table.py outputs/models_outcomes.json --check   # CI: fail on any difference

Only what the tests found is written: a family the run did not try shows as "not tried", never as supported.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS_PAGE = ROOT / "docs" / "models.md"
README = ROOT / "README.md"
START, END = "<!-- models:start -->", "<!-- models:end -->"

TRAINED = "trained, exact budget"
NAMED_ERROR = "named error"
NOT_BUILDABLE = "not buildable here"
NOT_TRIED = "not tried"
OUTCOMES = (TRAINED, NAMED_ERROR, NOT_BUILDABLE, NOT_TRIED)
COMMAND = "RAN_MODELS_OUTCOMES=outputs/models_outcomes.json python -m pytest -q tests/test_registry_sweep.py"
HEADER = ("mapping", "family", "head class", "image processor", "pixel layout", "outcome")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _lead(message: str, sentences: int = 2, limit: int = 400) -> str:
    """The first sentences of a message (what went wrong, then what to state), cut at `limit` characters."""
    lead = " ".join(re.split(r"(?<=\.)\s", message.strip())[:sentences])
    return lead if len(lead) <= limit else lead[: limit - 3] + "..."


def describe(row: dict) -> str:
    """The outcome cell: what happened, and the reason or the error's first sentence."""
    outcome = row["outcome"]
    if outcome == TRAINED:
        padding = row.get("padding_elements", 0)
        text = TRAINED + (f"; {padding} padding elements untouched" if padding else "")
        return text + (
            "; video frames stay clean (`UnattackedPixelsWarning`)" if row.get("takes_video") else ""
        )
    if outcome == NAMED_ERROR:
        return f"{NAMED_ERROR}: `{row.get('error', 'Error')}`: {_lead(row.get('detail', ''))}"
    if outcome == NOT_BUILDABLE:
        return f"{NOT_BUILDABLE}: {row.get('reason', '')} ({_lead(row.get('detail', ''), 1, 160)})"
    return outcome


def table_rows(outcomes: dict, registry: list[tuple[str, str, str]] | None = None) -> list[dict]:
    """One row per family of the registry the outcomes were made against (or of the outcomes alone), in order;
    families without an outcome are "not tried"."""
    found = {(row["mapping"], row["model_type"]): row for row in outcomes["families"]}
    registry = registry or [
        (row["mapping"], row["model_type"], row["head_class"]) for row in outcomes["families"]
    ]
    rows = []
    for mapping, model_type, head_class in registry:
        row = found.get((mapping, model_type)) or {
            "mapping": mapping, "model_type": model_type, "head_class": head_class, "outcome": NOT_TRIED,
        }  # fmt: skip
        if row["outcome"] not in OUTCOMES:
            raise SystemExit(
                f"{mapping}/{model_type} has outcome {row['outcome']!r}, which no table shows: the sweep failed "
                "for it (run the tests and fix it first)."
            )
        rows.append(row)
    return rows


def counts(rows: list[dict]) -> dict[str, Counter]:
    by_mapping: dict[str, Counter] = {}
    for row in rows:
        by_mapping.setdefault(row["mapping"], Counter())[row["outcome"]] += 1
    return by_mapping


def _reasons(rows: list[dict], mapping: str) -> str:
    reasons = Counter(
        row.get("reason", "") for row in rows if row["mapping"] == mapping and row["outcome"] == NOT_BUILDABLE
    )
    return ", ".join(f"{reason} {count}" for reason, count in reasons.most_common())


def counts_table(rows: list[dict]) -> list[str]:
    lines = [
        "| mapping | families | trained, exact budget | named error | not buildable here (why) | not tried |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mapping, counter in counts(rows).items():
        total = sum(counter.values())
        lines.append(
            f"| {mapping} | {total} | {counter[TRAINED]} | {counter[NAMED_ERROR]} | {counter[NOT_BUILDABLE]} "
            f"({_reasons(rows, mapping) or 'none'}) | {counter[NOT_TRIED]} |"
        )
    return lines


def row_line(row: dict) -> str:
    cells = (
        row["mapping"],
        row["model_type"],
        f"`{row['head_class']}`",
        f"`{row['image_processor']}`" if row.get("image_processor") else "",
        row.get("pixel_layout", ""),
        describe(row),
    )
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def models_page(outcomes: dict, rows: list[dict]) -> str:
    lines = [
        "# Every vision-language family transformers ships, tried with RAN",
        "",
        "<!-- Generated by docs/gen_models_table.py from the sweep's outcomes: do not edit by hand (CI checks). -->",
        "",
        f"transformers {outcomes['transformers']}, torch {outcomes['torch']}: every family of its auto mappings for "
        + ", ".join(outcomes["mappings"])
        + ", built tiny from its config class with its real image processor (PIL backend), offline, and trained "
        "two steps with the stock `Trainer` and `RANCallback` (`tests/test_registry_sweep.py`). "
        f"Command: `{COMMAND}`, then `python docs/gen_models_table.py outputs/models_outcomes.json`.",
        "",
        f"- **{TRAINED}**: on real elements the perturbation is exactly `epsilon` in pixel units (to 1e-6) and the "
        "adversarial pixels stay in [0, 1]; every padding element is bit-identical; stock PEFT reloads the adapter "
        "with identical outputs. Real and padding elements and their pixel units come from the family's own "
        "processor (two solid grey images: what changes between them is image, what does not is padding), not from "
        "RAN's layout.",
        f"- **{NAMED_ERROR}**: RAN refuses at the first step with an error that says what to state or change.",
        f"- **{NOT_BUILDABLE}**: the family cannot be built tiny here; the reason is given.",
        "- *video frames stay clean*: the family's forward also takes `pixel_values_videos`; RAN attacks `pixel_values`"
        " only and says so once (`UnattackedPixelsWarning`). The video processors need torchvision, so the sweep makes"
        " no frames; `tests/test_video_inputs.py` measures it on Qwen2-VL.",
        "",
        *counts_table(rows),
        "",
        "| " + " | ".join(HEADER) + " |",
        "| " + " | ".join("---" for _ in HEADER) + " |",
        *(row_line(row) for row in rows),
        "",
    ]
    return "\n".join(lines)


def readme_section(outcomes: dict, rows: list[dict]) -> str:
    lines = [
        START,
        f"Every family in transformers {outcomes['transformers']}'s auto mappings, tried in the test suite "
        "(`tests/test_registry_sweep.py`; the whole table, with each family's head class, image processor, pixel "
        "layout and outcome, is [docs/models.md](docs/models.md)):",
        "",
        *counts_table(rows),
        "",
    ]
    for mapping in counts(rows):
        trained = [
            row["model_type"] for row in rows if row["mapping"] == mapping and row["outcome"] == TRAINED
        ]
        refused = [
            row["model_type"] for row in rows if row["mapping"] == mapping and row["outcome"] == NAMED_ERROR
        ]
        lines.append(f"- **{mapping}**, {TRAINED}: {', '.join(trained) or 'none'}.")
        if refused:
            lines.append(f"  Named error: {', '.join(refused)}.")
    lines += ["", END]
    return "\n".join(lines)


def with_readme_section(readme: str, section: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} markers to write the table between.")
    before, rest = readme.split(START, 1)
    _, after = rest.split(END, 1)
    return before + section + after


def _table_cells(text: str) -> dict[tuple[str, str], str]:
    """The family rows of a models page, keyed by (mapping, family)."""
    found = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == len(HEADER) and cells[0] not in (HEADER[0], "---"):
            found[(cells[0], cells[1])] = line
    return found


def differences(committed_page: str, page: str, committed_readme: str, readme: str) -> list[str]:
    """What differs between the committed files and what the tests found, row by row."""
    problems = []
    old, new = _table_cells(committed_page), _table_cells(page)
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            problems.append(
                f"docs/models.md row {key[0]} / {key[1]}:\n  committed: {old.get(key, '(missing)')}\n"
                f"  the tests: {new.get(key, '(missing)')}"
            )
    if not problems and committed_page != page:
        problems.append("docs/models.md differs outside the family rows (counts or text): regenerate it.")
    if committed_readme != readme:
        problems.append(
            f"README.md: the section between {START} and {END} differs from what the tests found."
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outcomes", type=Path, help="the JSON the sweep wrote ($RAN_MODELS_OUTCOMES)")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; fail if the committed files differ"
    )
    parser.add_argument("--page", type=Path, default=MODELS_PAGE)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    if not args.outcomes.exists():
        print(
            f"{args.outcomes} does not exist: run the sweep with RAN_MODELS_OUTCOMES={args.outcomes} first."
        )
        return 2
    outcomes = json.loads(args.outcomes.read_text())
    rows = table_rows(outcomes, [tuple(item) for item in outcomes.get("registry", [])] or None)
    page = models_page(outcomes, rows)
    readme_now = args.readme.read_text()
    readme = with_readme_section(readme_now, readme_section(outcomes, rows))
    if args.check:
        committed_page = args.page.read_text() if args.page.exists() else ""
        problems = differences(committed_page, page, readme_now, readme)
        for problem in problems:
            print(problem)
        if problems:
            print(f"{len(problems)} difference(s): the committed tables are not what the tests found. Regenerate: "
                  f"python docs/gen_models_table.py {args.outcomes}")  # fmt: skip
            return 1
        print(f"{args.page.name} and the README table match the tests ({len(rows)} families).")
        return 0
    args.page.write_text(page)
    args.readme.write_text(readme)
    print(f"wrote {args.page} and the README table ({len(rows)} families)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
