"""The example scripts, end to end on tiny offline models: exit codes, outputs, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "examples" / "finetune.py"


def _run(args, tmp_path, timeout=600, launcher=None):
    command = (launcher or [sys.executable]) + [str(FINETUNE), *args]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAN_PEFT_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


QUICK = [
    "--max-steps",
    "3",
    "--train-size",
    "48",
    "--eval-size",
    "24",
    "--batch-size",
    "8",
    "--eval-attack-steps",
    "2",
    "--no-progress",
]


def test_finetune_runs_offline_and_writes_an_adapter_stock_peft_loads(tmp_path, tiny_clip_dir):
    out = tmp_path / "out"
    result = _run(
        ["--model", str(tiny_clip_dir), "--output-dir", str(out), "--compare-lora", *QUICK], tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    names = {p.name for p in out.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "ran_config.json",
        "README.md",
        "ran_metrics.json",
        "ran_metrics.png",
    } <= names
    metrics = json.loads((out / "ran_metrics.json").read_text())
    assert set(metrics["runs"]) == {"before", "lora", "ran"}
    for run in metrics["runs"].values():
        assert 0 <= run["clean_accuracy"] <= 1 and set(run["robust_accuracy"]) == {"1/255", "2/255", "4/255"}
    assert "ran/kl" in metrics["train_log"][-1]
    # the reported robust accuracy is AutoAttack's (the quick variant by default), named in the card and the JSON
    assert metrics["attack"]["name"] == "AutoAttack-quick"
    assert all(run["attack"]["name"] == "AutoAttack-quick" for run in metrics["runs"].values())
    card = (out / "README.md").read_text()
    assert "AutoAttack-quick" in card and "APGD-T" in card and "PGD-10" not in card
    assert "clean" in result.stdout and "@4/255" in result.stdout
    check = (
        "import sys; from transformers import CLIPModel; from peft import PeftModel; "
        f"PeftModel.from_pretrained(CLIPModel.from_pretrained({str(tiny_clip_dir)!r}), {str(out)!r}); "
        "assert not any(m.startswith('ran_peft') for m in sys.modules); print('ok')"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=240)
    assert loaded.returncode == 0 and "ok" in loaded.stdout, loaded.stderr[-2000:]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epsilon", "2"], "RANConfig.epsilon=2.0 is not allowed"),
        (["--model", "/no/such/model/folder"], "--model='/no/such/model/folder'"),
        (["--model", "{tiny}", "--dataset", "{textonly}"], "image_column='image'"),
        (["--push-to-hub"], "--push-to-hub needs --hub-repo-id"),
        (["--max-steps", "0"], "--max-steps=0"),
        (["--task", "tumour"], "--task='tumour' must be one of finding, modality"),
        (["--eval-attack", "fgsm"], "--eval-attack='fgsm' must be one of autoattack"),
    ],
)
def test_bad_arguments_end_with_one_clear_line_and_write_nothing(tmp_path, tiny_clip_dir, args, message):
    import datasets

    text_only = tmp_path / "text-only"
    datasets.Dataset.from_dict({"caption": ["a", "b"], "label": [0, 1]}).save_to_disk(str(text_only))
    args = [a.format(tiny=tiny_clip_dir, textonly=text_only) for a in args]
    out = tmp_path / "out"
    result = _run([*QUICK, "--output-dir", str(out), *args], tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_four_bit_without_bitsandbytes_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import finetune
    finally:
        sys.path.pop(0)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    arguments = finetune.FinetuneArguments(load_in_4bit=True, output_dir=str(tmp_path / "out"))
    with pytest.raises(finetune.UsageError, match="needs bitsandbytes"):
        finetune.check_arguments(arguments)


@pytest.mark.slow
def test_finetune_under_torchrun_with_two_cpu_processes(tmp_path, tiny_clip_dir):
    out = tmp_path / "ddp"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
    ]
    result = _run(
        ["--model", str(tiny_clip_dir), "--output-dir", str(out), *QUICK, "--max-steps", "4"],
        tmp_path,
        launcher=launcher,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert len(list(tmp_path.glob("**/adapter_model.safetensors"))) == 1


def test_default_model_is_built_once_and_then_reused(tmp_path, monkeypatch):
    from ran_peft import pretrain

    calls = []
    real_pretrain = pretrain.pretrain_clip

    def counted(*args, **kwargs):
        calls.append(1)
        return real_pretrain(*args, **kwargs)

    monkeypatch.setattr(pretrain, "pretrain_clip", counted)
    folder = pretrain.build_default_model(tmp_path / "model", upstream_size=16, steps=1, progress=False)
    assert (folder / pretrain.BUILD_MARKER).is_file() and (folder / "model.safetensors").is_file()
    again = pretrain.build_default_model(tmp_path / "model", upstream_size=16, steps=1, progress=False)
    assert again == folder and len(calls) == 1
    assert not list(tmp_path.glob(".model.*"))


def test_finetune_recipe_defaults_are_ran_configs_defaults():
    # The ablation backs RANConfig's defaults; the script must not quietly train another recipe.
    import dataclasses
    import importlib.util

    from ran_peft import RANConfig

    spec = importlib.util.spec_from_file_location("ran_peft_example_finetune", FINETUNE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    script = {f.name: f.default for f in dataclasses.fields(module.FinetuneArguments)}
    config = RANConfig()
    recipe = [
        "epsilon",
        "attack_steps",
        "adversarial_weight",
        "kl_weight",
        "consistency_weight",
        "covariance_weight",
        "spectrum_weight",
        "noise_warmup_steps",
        "free_start",
        "text_epsilon",
    ]
    assert {name: script[name] for name in recipe} == {name: getattr(config, name) for name in recipe}


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_each_example_runs_from_a_copy_in_an_empty_folder(tmp_path, script):
    """Examples import ran_peft and the Hugging Face libraries only: a copy alone in a folder parses its options."""
    copy = tmp_path / script
    copy.write_text((ROOT / "examples" / script).read_text())
    result = subprocess.run(
        [sys.executable, str(copy), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout
