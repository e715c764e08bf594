"""Ablation of the RAN recipe: each term of the default `RANConfig` switched off in turn, the terms that are off by
default switched on, and the main settings varied; same data, steps, seed and evaluation as `robustness.py`.

Writes FILE.json and FILE.md: a table (clean and robust accuracy, train time, the change against the default) and a
paragraph generated from the measured numbers on what they say about the defaults.

    python benchmarks/ablation.py --out ablation.json [--quick] [--variants default,no_kl,lora]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ran_peft.experiments import clip_ran_config, lora_equivalent


def _load_robustness():
    """`robustness.py` from its file path (this folder is kept off the import path on purpose)."""
    name = "ran_peft_benchmarks_robustness"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("robustness.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


robustness = _load_robustness()

CLEAN_TOLERANCE = 0.03  # "clean within 3 points of LoRA"


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: the default recipe with `overrides` (or plain LoRA when `lora` is set)."""

    kind: str  # "default", "reference", "off" (a default term off), "on" (an off-by-default term on), "setting", "gap"
    overrides: dict[str, Any] = field(default_factory=dict)
    lora: bool = False
    steps_factor: int = 1  # train for this many times the run's --steps
    warmup_share: float | None = None  # epsilon/KL warm-up over this share of the steps (a curriculum)

    def change(self) -> str:
        if self.lora:
            return "every RAN term off (epsilon 0, all weights 0)"
        from ran_peft.evaluation import format_epsilon

        def shown(key: str, value: Any) -> str:
            return format_epsilon(value) if key.endswith("epsilon") and value else str(value)

        changes = [f"{k}={shown(k, v)}" for k, v in self.overrides.items()]
        if self.steps_factor != 1:
            changes.append(f"{self.steps_factor}x the steps")
        if self.warmup_share is not None:
            changes.append(f"epsilon and KL ramp up over {100 * self.warmup_share:.0f} % of the steps")
        return ", ".join(changes) or "RANConfig defaults"


VARIANTS: dict[str, Variant] = {
    "default": Variant("default"),
    "lora": Variant("reference", lora=True),
    # default terms switched off
    "no_adversarial_loss": Variant("off", {"adversarial_weight": 0.0}),
    "no_kl": Variant("off", {"kl_weight": 0.0}),
    "no_free_start": Variant("off", {"free_start": False}),
    "no_random_start": Variant("off", {"random_start": False}),
    # terms that are off by default switched on
    "consistency": Variant("on", {"consistency_weight": 1.0}),
    "covariance": Variant("on", {"covariance_weight": 1.0}),
    "spectrum": Variant("on", {"spectrum_weight": 0.1}),
    "text_attack": Variant("on", {"text_epsilon": 0.01}),
    # other values of the main settings
    "attack_steps_2": Variant("setting", {"attack_steps": 2}),
    "adversarial_weight_1": Variant("setting", {"adversarial_weight": 1.0}),
    "kl_weight_3": Variant("setting", {"kl_weight": 3.0}),
    "kl_weight_0.3": Variant("setting", {"kl_weight": 0.3}),
    "adversarial_weight_0.25": Variant("setting", {"adversarial_weight": 0.25}),
    "epsilon_2": Variant("setting", {"epsilon": 2 / 255}),
    "warmup_50": Variant("setting", {"noise_warmup_steps": 50}),
    # closing the clean gap (issue 13): a KL to the pre-trained model, curricula, capacity, longer training
    "reference_kl": Variant("gap", {"reference_kl_weight": 1.0}),
    "reference_kl_instead": Variant("gap", {"reference_kl_weight": 1.0, "kl_weight": 0.0}),
    "curriculum": Variant("gap", warmup_share=2 / 3),
    "rank_16": Variant("gap", {"r": 16, "lora_alpha": 32}),
    "steps_x2": Variant("gap", steps_factor=2),
}


def variant_config(default, variant: Variant):
    return lora_equivalent(default) if variant.lora else replace(default, **variant.overrides)


# -- what the numbers say ----------------------------------------------------------------------------------------


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def noise_band(accuracy: float, samples: int) -> float:
    """Two standard errors of the difference of two accuracies measured on `samples` samples each."""
    return 2 * math.sqrt(2 * max(accuracy * (1 - accuracy), 1e-4) / max(samples, 1))


GAP_GOAL = {"clean_points": 3.0, "robust_points_over_lora": 20.0, "time_ratio": 2.2}


def clean_gap_sentence(rows: dict[str, Any], key: str) -> str:
    """Which rows meet the clean-gap goal: clean within 3 points of LoRA, robust at least LoRA + 20, <= 2.2x time."""
    lora = rows["lora"]
    met, missed = [], []
    for name, row in rows.items():
        if name == "lora":
            continue
        gap = 100 * (lora["clean_acc"] - row["clean_acc"])
        lead = 100 * (row["robust_acc"][key] - lora["robust_acc"][key])
        ratio = row["train_seconds"] / lora["train_seconds"] if lora["train_seconds"] > 0 else float("nan")
        text = f"`{name}` (clean -{gap:.1f}, robust +{lead:.1f}, {ratio:.2f}x)"
        ok = (
            gap <= GAP_GOAL["clean_points"]
            and lead >= GAP_GOAL["robust_points_over_lora"]
            and ratio <= GAP_GOAL["time_ratio"]
        )
        (met if ok else missed).append(text)
    goal = (
        f"clean within {GAP_GOAL['clean_points']:.0f} points of LoRA, robust@{key} at least "
        f"{GAP_GOAL['robust_points_over_lora']:.0f} points above LoRA's, at most {GAP_GOAL['time_ratio']}x LoRA's "
        "train time"
    )
    if met:
        return f"The clean-gap goal ({goal}) is met by: {', '.join(met)}."
    return f"No row meets the clean-gap goal ({goal}); closest: {', '.join(missed)}."


def defaults_paragraph(results: dict[str, Any]) -> str:
    """Sentences on the defaults, computed from the measured numbers (no claim is written by hand)."""
    rows = results["variants"]
    if "default" not in rows:
        return "The default recipe was not run, so the table says nothing about the defaults."
    key = max(rows["default"]["robust_acc"], key=robustness_epsilon)
    default = rows["default"]
    band = noise_band(default["robust_acc"][key], default["eval_samples"])
    sentences = [
        f"Measured on {default['eval_samples']} samples with one seed: differences within ±{100 * band:.1f} "
        f"points (two standard errors of a difference at the default's robust@{key}) are treated as noise."
    ]
    lora = rows.get("lora")
    candidates = {name: row for name, row in rows.items() if name != "lora"}
    if lora is not None:
        floor = lora["clean_acc"] - CLEAN_TOLERANCE
        candidates = {name: row for name, row in candidates.items() if row["clean_acc"] >= floor}
        sentences.append(
            f"LoRA reaches {100 * lora['clean_acc']:.1f} clean and {100 * lora['robust_acc'][key]:.1f} "
            f"robust@{key}; {len(candidates)} of {len(rows) - 1} RAN variants keep clean accuracy within "
            f"{100 * CLEAN_TOLERANCE:.0f} points of it."
        )
    if candidates:
        best = max(candidates, key=lambda name: candidates[name]["robust_acc"][key])
        gain = candidates[best]["robust_acc"][key] - default["robust_acc"][key]
        qualifier = "" if lora is None else " among them"
        if best == "default":
            sentences.append(f"The best robust@{key}{qualifier} is the default's ({_pct(default, key)}).")
        else:
            verdict = "beyond the noise" if gain > band else "within the noise"
            sentences.append(
                f"The best robust@{key}{qualifier} is `{best}` ({VARIANTS[best].change()}): "
                f"{_pct(candidates[best], key)}, {_points(gain)} points against the default ({verdict})."
            )
    else:
        sentences.append("No variant keeps clean accuracy within the tolerance of LoRA.")
    if lora is not None and "default" not in candidates:
        sentences.append(
            f"The default itself loses {100 * (lora['clean_acc'] - default['clean_acc']):.1f} clean points "
            "against LoRA, more than the tolerance."
        )

    helping, neutral, hurting = [], [], []
    for name, row in rows.items():
        if VARIANTS[name].kind != "off":
            continue
        delta = row["robust_acc"][key] - default["robust_acc"][key]
        text = f"`{name}` {_points(delta)}"
        (helping if delta < -band else hurting if delta > band else neutral).append(text)
    if helping or neutral or hurting:
        parts = []
        if helping:
            parts.append(
                f"switching off these default terms costs robustness beyond the noise: {', '.join(helping)}"
            )
        if neutral:
            parts.append(f"these change robust@{key} within the noise: {', '.join(neutral)}")
        if hurting:
            parts.append(f"switching these off gains robustness beyond the noise: {', '.join(hurting)}")
        sentences.append("Of the default terms, " + "; ".join(parts) + f" (points of robust@{key}).")

    worth, idle = [], []
    for name, row in rows.items():
        if VARIANTS[name].kind not in ("on", "setting", "gap"):
            continue
        delta = row["robust_acc"][key] - default["robust_acc"][key]
        clean_ok = lora is None or row["clean_acc"] >= lora["clean_acc"] - CLEAN_TOLERANCE
        cost = (
            row["train_seconds"] / default["train_seconds"] if default["train_seconds"] > 0 else float("nan")
        )
        text = f"`{name}` {_points(delta)} at {cost:.2f}× the default's train time"
        (worth if delta > band and clean_ok else idle).append(text)
    if worth:
        sentences.append(
            "These alternatives beat the default beyond the noise with clean accuracy kept: "
            + ", ".join(worth)
            + "."
        )
    if idle:
        sentences.append(
            "These alternatives do not beat the default beyond the noise (or lose clean accuracy): "
            + ", ".join(idle)
            + "."
        )

    if lora is not None:
        sentences.append(clean_gap_sentence(rows, key))
    if candidates:
        best_gain = max(row["robust_acc"][key] for row in candidates.values()) - default["robust_acc"][key]
        if best_gain <= band and "default" in candidates:
            sentences.append("On these numbers the defaults stand: no variant beats them beyond the noise.")
        elif best_gain > band:
            sentences.append(
                f"On these numbers the defaults should change towards `{best}` ({VARIANTS[best].change()}); "
                "confirm with more seeds first."
            )
        else:
            sentences.append("On these numbers the default loses too much clean accuracy to stand as is.")
    return " ".join(sentences)


def robustness_epsilon(key: str) -> float:
    from ran_peft.evaluation import parse_epsilon

    return parse_epsilon(key)


def _pct(row: dict[str, Any], key: str) -> str:
    return f"{100 * row['robust_acc'][key]:.1f}"


def ablation_markdown(results: dict[str, Any]) -> str:
    rows = results["variants"]
    keys = list(next(iter(rows.values()))["robust_acc"])
    default = rows.get("default")
    header = "| variant | change | clean | " + " | ".join(f"robust @{k}" for k in keys) + " | train s |"
    lines = [header, "|" + " --- |" * (len(keys) + 4)]

    def cell(value: float, reference: float | None) -> str:
        if reference is None:
            return robustness.percent(value)
        return f"{robustness.percent(value)} ({_points(value - reference)})"

    for name, row in rows.items():
        is_default = name == "default" or default is None
        clean = cell(row["clean_acc"], None if is_default else default["clean_acc"])
        robust = " | ".join(
            cell(row["robust_acc"][k], None if is_default else default["robust_acc"][k]) for k in keys
        )
        seconds = f"{row['train_seconds']:.1f}"
        if not is_default and default["train_seconds"] > 0:
            seconds += f" ({row['train_seconds'] / default['train_seconds']:.2f}×)"
        lines.append(f"| {name} | {VARIANTS[name].change()} | {clean} | {robust} | {seconds} |")
    return "\n".join(
        [
            "# Ablation of the RAN recipe",
            "",
            "Accuracy in %; in brackets the change against `default` (points; train time as a ratio). "
            + robustness.describe_attack(results),
            "",
            *lines,
            "",
            robustness.masking_note(rows),
            "",
            "## What the table says about the defaults",
            "",
            defaults_paragraph(results),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    robustness.add_common_arguments(parser)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}"
    )
    args = robustness.resolve_sizes(parser.parse_args(argv))
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        raise SystemExit(
            f"error: --variants={args.variants!r}: unknown {unknown}; choose from {','.join(VARIANTS)}."
        )
    out = Path(args.out)

    setup = robustness.prepare(args)
    default = clip_ran_config(setup.pixel_box)
    configs = {name: variant_config(default, VARIANTS[name]) for name in VARIANTS if name in names}
    for name, config in configs.items():
        if VARIANTS[name].warmup_share is not None:
            config.noise_warmup_steps = round(VARIANTS[name].warmup_share * args.steps)
    robustness.check_evaluation_is_stronger(setup, configs)
    results = {
        "benchmark": "ablation",
        **robustness.environment(setup),
        "default_recipe": default.recipe_dict(),
        "variants_run": {
            name: {"kind": VARIANTS[name].kind, "change": VARIANTS[name].change()} for name in configs
        },
        "variants": {},
    }
    started = time.perf_counter()
    for index, (name, config) in enumerate(configs.items(), start=1):
        print(f"variant {index}/{len(configs)}: {name} ({VARIANTS[name].change()})", flush=True)
        variant = VARIANTS[name]
        run_setup = setup
        if variant.steps_factor != 1:
            steps = variant.steps_factor * setup.settings.max_steps
            run_setup = replace(setup, settings=replace(setup.settings, max_steps=steps))
        results["variants"][name] = robustness.run_method(run_setup, name, config)
        robustness.write_json(results, out)  # partial results survive an interrupted run
    results["total_seconds"] = time.perf_counter() - started
    if "default" in results["variants"]:
        reference = results["variants"]["default"]
        for row in results["variants"].values():
            row["delta_vs_default"] = {
                "clean_acc": row["clean_acc"] - reference["clean_acc"],
                "robust_acc": {k: v - reference["robust_acc"][k] for k, v in row["robust_acc"].items()},
                "train_seconds_ratio": row["train_seconds"] / reference["train_seconds"],
            }
    results["defaults_paragraph"] = defaults_paragraph(results)
    robustness.write_json(results, out)
    markdown = ablation_markdown(results)
    robustness.sibling(out, ".md").write_text(markdown)
    print(markdown)
    print(f"total {results['total_seconds']:.0f} s; wrote {out} and {robustness.sibling(out, '.md')}")
    return results


if __name__ == "__main__":
    main()
