"""Check the robust accuracy a fine-tuning run reports against a separate APGD-T run on the same rows.

`examples/finetune.py` writes the robust accuracy of its adapter (AutoAttack, or its quick variant) into the model
card and `ran_metrics.json`. This script reloads the saved adapter on its base model, rebuilds the same evaluation
rows (same task, size, seed and prompts as the run's defaults or the options given), runs torchattacks' APGD-T alone
(100 iterations, every other class as a target, a different seed from the run's), and says whether each budget's
figure matches within `--tolerance` points. Exit status 0: all match; 1: a mismatch.

    python examples/finetune.py --output-dir run
    python benchmarks/autoattack_check.py --adapter run [--seed 42 --eval-size 300 --task anatomy]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

FINETUNE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"


def _finetune():
    spec = importlib.util.spec_from_file_location("ran_peft_example_finetune", FINETUNE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def apgd_t_accuracy(model, loader, pixel_box, class_text_inputs, epsilon, seed, steps=100):
    """Accuracy under APGD-T alone (torchattacks), scored on the budget-projected examples."""
    import torchattacks

    from ran_peft.autoattack import PixelSpaceClassifier, _within_budget
    from ran_peft.evaluation import _evaluation_mode
    from ran_peft.families import detect_family

    family = detect_family(model, class_text_inputs)
    right = total = 0
    with torch.random.fork_rng(devices=[]), _evaluation_mode(model):
        for batch in loader:
            classifier = PixelSpaceClassifier(model, family, pixel_box, batch["pixel_values"].dtype)
            pixels = classifier.to_pixels(batch["pixel_values"]).clamp(0, 1)
            labels = batch["labels"]
            with torch.no_grad():
                logits = classifier(pixels)
            correct = logits.argmax(-1).eq(labels)
            targets = min(9, logits.shape[-1] - 1)
            rows = correct.nonzero().flatten()
            if rows.numel():
                attack = torchattacks.APGDT(
                    classifier, norm="Linf", eps=epsilon, steps=steps, seed=seed, n_classes=targets + 1
                )
                adversarial = _within_budget(attack(pixels[rows], labels[rows]), pixels[rows], epsilon)
                with torch.no_grad():
                    fooled = classifier(adversarial).argmax(-1).ne(labels[rows])
                correct[rows[fooled]] = False
            right += int(correct.sum())
            total += labels.numel()
    return right / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", required=True, help="output folder of examples/finetune.py")
    parser.add_argument("--model", default=None, help="the run's --model (default: the embedded model)")
    parser.add_argument("--task", default="anatomy")
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument(
        "--seed", type=int, default=42, help="the run's --seed (it fixes the evaluation rows)"
    )
    parser.add_argument("--attack-seed", type=int, default=12345, help="APGD-T's own seed (not the run's)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--budgets", default=None, help="comma-separated subset of the card's budgets (default all)"
    )
    parser.add_argument("--tolerance", type=float, default=1.0, help="allowed difference in points")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import PeftModel
    from transformers import AutoModel, AutoProcessor

    from ran_peft.evaluation import parse_epsilon

    finetune = _finetune()
    run_args = finetune.FinetuneArguments(
        output_dir=str(args.adapter),
        model=args.model,
        task=args.task,
        eval_size=args.eval_size,
        seed=args.seed,
    )
    metrics = json.loads((Path(args.adapter) / "ran_metrics.json").read_text())
    reported = metrics["runs"]["ran"]["robust_accuracy"]
    folder = args.model or str(finetune_default_model())
    processor = AutoProcessor.from_pretrained(folder)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(folder), args.adapter).eval()
    train, evaluation = finetune.load_data(run_args)
    config = _ran_config(args.adapter)
    class_text_inputs, collator, pixel_box, _ = finetune.classification_setup(
        run_args, processor, train, config, folder, [parse_epsilon(k) for k in reported]
    )
    loader = torch.utils.data.DataLoader(evaluation, batch_size=64, collate_fn=collator)
    rows = {}
    chosen = [b.strip() for b in args.budgets.split(",")] if args.budgets else list(reported)
    unknown = sorted(set(chosen) - set(reported))
    if unknown:
        raise SystemExit(f"error: --budgets={args.budgets!r}: the card reports only {', '.join(reported)}.")
    for key in chosen:
        figure = reported[key]
        accuracy = apgd_t_accuracy(
            model, loader, pixel_box, class_text_inputs, parse_epsilon(key), args.attack_seed, args.steps
        )
        difference = 100 * (figure - accuracy)
        rows[key] = {
            "reported": figure,
            "reported_attack": metrics["attack"].get("name"),
            "apgd_t_alone": accuracy,
            "difference_points": difference,
            "match": abs(difference) <= args.tolerance,
        }
        print(
            f"@{key}: card {100 * figure:.1f} ({metrics['attack'].get('name')}) vs APGD-T-{args.steps} alone "
            f"{100 * accuracy:.1f}: {difference:+.1f} points -> {'match' if rows[key]['match'] else 'MISMATCH'}",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"adapter": str(args.adapter), "rows": rows}, indent=2))
    return 0 if all(row["match"] for row in rows.values()) else 1


def finetune_default_model():
    from ran_peft.pretrain import build_default_model

    return build_default_model(progress=False)


def _ran_config(folder: str):
    from ran_peft import RANConfig

    return RANConfig.from_pretrained(folder)


if __name__ == "__main__":
    sys.exit(main())
