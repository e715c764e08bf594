"""examples/noise_study.py: the study end to end at micro size (report structure, plot, noise share), its command
line presets, and the finding it derives from the numbers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_study():
    spec = importlib.util.spec_from_file_location("noise_study", ROOT / "examples" / "noise_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


study = _load_study()

MICRO = dict(
    ratios=(0.0, 0.25),
    noise_steps=2,
    image_size=32,
    upstream_size=30,
    pretrain_steps=3,
    pretrain_batch_size=8,
    train_size=16,
    eval_size=8,
    finetune_steps=2,
    batch_size=8,
    eval_epsilons=(1 / 255, 4 / 255),
    eval_attack_steps=2,
    transfer_train_size=16,
    transfer_eval_size=8,
    progress=False,
)


@pytest.mark.slow  # 10-20 s on a busy 2-core machine
def test_micro_study_writes_report_plot_and_exact_noise_share(tmp_path):
    settings = study.StudySettings(**MICRO)
    out = tmp_path / "study" / "noise.json"
    work = tmp_path / "work"
    returned = study.run_study(settings, out, work_dir=work)

    report = json.loads(out.read_text())
    assert report["results"] == json.loads(json.dumps(returned["results"]))
    assert out.with_suffix(".png").stat().st_size > 0
    assert [entry["ratio"] for entry in report["results"]] == [0.0, 0.25]
    n = settings.upstream_size
    for entry in report["results"]:
        assert entry["upstream_rows"] == n
        assert entry["noisy_fraction"] == round(entry["ratio"] * n) / n
        for method in ("lora", "ran"):
            run = entry[method]
            assert 0 <= run["clean_accuracy"] <= 1
            assert set(run["robust_accuracy"]) == {"1/255", "4/255"}
            assert all(0 <= value <= run["clean_accuracy"] for value in run["robust_accuracy"].values())
            assert run["attack"]["steps"] == 2 and run["num_samples"] == settings.eval_size
        transfer = entry["transfer"]
        assert transfer["task"] == "modality"
        assert all(0 <= transfer[name] <= 1 for name in ("upstream", "lora", "ran"))
    assert report["results"][1]["noisy_rows"] == 8  # round(0.25 * 30) = round(7.5) = 8
    timings = report["timings_seconds"]
    assert {"data", "surrogate_pretraining", "plot", "total"} <= set(timings)
    assert {"noise", "pretraining", "lora_train", "lora_eval", "ran_train", "ran_eval"} <= set(
        timings["per_ratio"]["0.25"]
    )
    assert isinstance(report["finding"], str) and "RAN" in report["finding"]
    assert work.is_dir() and not (tmp_path / "study" / ".noise.json.tmp").exists()


def test_quick_preset_and_command_line_overrides():
    parser = study.build_parser()
    quick = study.settings_from_arguments(parser.parse_args(["--quick", "--ratios", "0,10%", "--seed", "3"]))
    assert quick.ratios == (0.0, 0.1) and quick.seed == 3
    assert (
        quick.image_size == study.QUICK["image_size"] and quick.upstream_size == study.QUICK["upstream_size"]
    )
    full = study.settings_from_arguments(parser.parse_args(["--eval-epsilons", "2/255", "--no-progress"]))
    assert full == study.StudySettings(eval_epsilons=(2 / 255,), progress=False)
    assert full.ratios == (0.0, 0.05, 0.1, 0.2, 0.3, 0.5) and full.eval_attack_steps >= 10


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(ratios=(0.0, 1.5)), "--ratios"),
        (dict(pretrain_batch_size=64, upstream_size=32), "--pretrain-batch-size"),
        (dict(transfer_task="colour"), "--transfer-task"),
        (dict(image_size=36), "--image-size"),
    ],
)
def test_bad_settings_fail_before_anything_runs(tmp_path, settings, message):
    with pytest.raises(study.UsageError, match=message):
        study.run_study(study.StudySettings(**settings), tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def _fake_report(robust_by_ratio, transfer_by_ratio, n=400):
    results = []
    for (ratio, robust), upstream in zip(robust_by_ratio.items(), transfer_by_ratio, strict=True):
        run = {"clean_accuracy": 0.8, "robust_accuracy": {"1/255": robust, "4/255": robust}, "num_samples": n}
        results.append(
            {
                "ratio": ratio,
                "lora": run,
                "ran": {**run, "robust_accuracy": {k: v + 0.1 for k, v in run["robust_accuracy"].items()}},
                "transfer": {"task": "laterality", "upstream": upstream, "lora": 0.5, "ran": 0.5},
            }
        )
    return {"results": results, "settings": {"transfer_eval_size": n}}


def test_finding_reports_a_rise_then_fall_only_when_the_numbers_show_one():
    peaked = study.finding(_fake_report({0.0: 0.30, 0.1: 0.50, 0.5: 0.20}, [0.6, 0.6, 0.6]))
    assert "shows in: LoRA, RAN; not in: transfer" in peaked
    assert "RAN is +10.0 points robust" in peaked
    flat = study.finding(_fake_report({0.0: 0.30, 0.1: 0.31, 0.5: 0.30}, [0.6, 0.61, 0.6]))
    assert "None of these curves shows" in flat
    two_levels = study.finding(_fake_report({0.0: 0.30, 0.2: 0.50}, [0.6, 0.6]))
    assert "not tested" in two_levels
