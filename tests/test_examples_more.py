"""`examples/finetune_llava.py` and `examples/finetune_4bit.py`, end to end on tiny offline models: exit codes,
outputs that stock PEFT loads, and one-line errors that leave nothing behind."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers  # noqa: F401  (its log handler binds to the session's stderr, not a test's capsys)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ADAPTER_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "ran_config.json",
    "README.md",
    "ran_metrics.json",
}
QUICK = ["--max-steps", "2", "--eval-attack-steps", "1", "--eval-epsilons", "4/255", "--no-progress"]


def _start(script: str, args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAN_PEFT_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(EXAMPLES / script), *args]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory, tiny_generative_default):
    """Both examples run at the same time (most of each run is importing): name -> (result, out). The LLaVA one runs
    with no model argument, on the generative default's build at a tiny size placed in its cache."""
    from ran_peft.pretrain_llava import DEFAULT_LLAVA_NAME

    started = {}
    for name, script, sizes in (
        ("llava", "finetune_llava.py", ["--train-size", "8", "--eval-size", "6", "--batch-size", "4"]),
        (
            "four_bit",
            "finetune_4bit.py",
            ["--tiny", "--train-size", "16", "--eval-size", "8", "--batch-size", "8"],
        ),
    ):
        tmp_path = tmp_path_factory.mktemp(name)
        shutil.copytree(tiny_generative_default, tmp_path / "cache" / DEFAULT_LLAVA_NAME)
        out = tmp_path / "out"
        process = _start(script, [*sizes, *QUICK, "--output-dir", str(out)], tmp_path)
        started[name] = (process, out)
    runs = {}
    for name, (process, out) in started.items():
        stdout, stderr = process.communicate(timeout=600)
        runs[name] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), out)
    return runs


def test_llava_default_trains_on_answers_and_reports_autoattack_on_the_card(example_runs):
    result, out = example_runs["llava"]
    assert result.returncode == 0, result.stderr[-4000:]
    assert {p.name for p in out.iterdir()} >= ADAPTER_FILES
    metrics = json.loads((out / "ran_metrics.json").read_text())
    assert set(metrics["runs"]) == {"before", "ran"}
    assert metrics["base_model"] == "generative-default (offline)"
    for run in metrics["runs"].values():
        assert (
            run["num_samples"] == 6 and run["closed_rows"] == 6 and set(run["robust_accuracy"]) == {"4/255"}
        )
        assert set(run["generation"]["robust_accuracy"]) == {"4/255"}
    assert metrics["attack"]["name"] == "AutoAttack-quick" and "APGD-T" in metrics["attack"]["description"]
    assert "ran/kl" in metrics["train_log"][-1]
    # the printed table, the card and ran_metrics.json carry the same figures, with the attack named
    card = (out / "README.md").read_text()
    assert "AutoAttack-quick" in result.stdout and "AutoAttack-quick" in card
    for name, run in metrics["runs"].items():
        figures = [run["clean_accuracy"], run["robust_accuracy"]["4/255"]]
        printed = f"{name:<8} " + f"{100 * figures[0]:7.1f} {100 * figures[1]:8.1f}"
        assert printed in result.stdout
        assert f"| {name} | {100 * figures[0]:.1f} | {100 * figures[1]:.1f} |" in card
        generated = run["generation"]
        row = f"| {name} | {100 * generated['clean_accuracy']:.1f} | {100 * generated['robust_accuracy']['4/255']:.1f} |"
        assert row in card.split("Generated answers")[1]


def test_llava_tiny_still_builds_a_random_smoke_model(tmp_path, monkeypatch):
    monkeypatch.setenv("RAN_PEFT_CACHE", str(tmp_path))
    args = _example("finetune_llava").LlavaFinetuneArguments(tiny=True)
    folder = Path(_example("finetune_llava").base_model_source(args))
    assert folder.parent == tmp_path and (folder / "model.safetensors").is_file()


def test_four_bit_tiny_clip_trains_reports_memory_and_writes_an_adapter(example_runs):
    result, out = example_runs["four_bit"]
    assert result.returncode == 0, result.stderr[-4000:]
    assert {p.name for p in out.iterdir()} >= ADAPTER_FILES | {"ran_metrics.png"}
    metrics = json.loads((out / "ran_metrics.json").read_text())
    assert set(metrics["runs"]) == {"before", "ran"}
    assert 0 < metrics["memory"]["four_bit_bytes"] < metrics["memory"]["fp32_bytes"] / 2
    assert "memory footprint" in result.stdout and "@4/255" in result.stdout


def test_both_adapters_load_in_stock_peft_without_ran_peft(example_runs):
    """Each adapter loads on its full-precision base in a process that never imports ran_peft (one for both:
    importing peft is most of the cost)."""
    loads = []
    runs = (("LlavaForConditionalGeneration", example_runs["llava"]), ("CLIPModel", example_runs["four_bit"]))
    for model_class, (result, out) in runs:
        assert result.returncode == 0, result.stderr[-2000:]
        base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        loads.append(
            f"model = PeftModel.from_pretrained(transformers.{model_class}.from_pretrained({base!r}), "
            f"{str(out)!r}); assert any('lora_A' in name for name, _ in model.named_parameters()); "
        )
    check = (
        "import sys, transformers; from peft import PeftModel; "
        + "".join(loads)
        + "assert not any(m.startswith('ran_peft') for m in sys.modules); print('ok')"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    loaded = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=240, env=env
    )
    assert loaded.returncode == 0 and "ok" in loaded.stdout, loaded.stderr[-2000:]


def _example(name: str):
    sys.path.insert(0, str(EXAMPLES))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("finetune_llava", ["--tiny", "--epsilon", "2"], "RANConfig.epsilon=2.0 is not allowed"),
        (
            "finetune_llava",
            ["--tiny", "--model", "owner/name"],
            "at most one of --model (a Hub id or folder) and --tiny",
        ),
        ("finetune_llava", ["--tiny", "--closed-answers", "yes,Yes"], "--closed-answers='yes,Yes'"),
        ("finetune_llava", ["--model", "/no/such/model/folder"], "--model='/no/such/model/folder'"),
        ("finetune_llava", ["--tiny", "--max-answer-tokens", "0"], "--max-answer-tokens=0"),
        ("finetune_llava", ["--tiny", "--eval-epsilons", "4/0"], "--eval-epsilons='4/0'"),
        ("finetune_llava", ["--tiny", "--dataset", "{vqa}", "--question-column", "query"], "'query'"),
        (
            "finetune_llava",
            ["--tiny", "--dataset", "{vqa}", "--answer-column", "reply"],
            "--answer-column='reply'",
        ),
        ("finetune_4bit", ["--tiny", "--epsilon", "2"], "RANConfig.epsilon=2.0 is not allowed"),
        ("finetune_4bit", ["--tiny", "--model", "owner/name"], "at most one of --model and --tiny"),
        ("finetune_4bit", ["--tiny", "--compute-dtype", "int8"], "--compute-dtype='int8'"),
    ],
)
def test_bad_arguments_end_with_one_clear_line_and_write_nothing(
    tmp_path, monkeypatch, capsys, script, args, message
):
    import datasets
    from PIL import Image

    vqa = tmp_path / "vqa"
    image = Image.new("RGB", (8, 8))
    datasets.Dataset.from_dict(
        {"image": [image, image], "question": ["q", "q"], "answer": ["a", "b"]}
    ).save_to_disk(str(vqa))
    monkeypatch.setenv("RAN_PEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    args = [arg.format(vqa=vqa) for arg in args]
    handlers = list(logging.getLogger().handlers)
    try:
        code = _example(script).main([*args, "--output-dir", str(out)])
    finally:  # main's logging.basicConfig points at this test's captured stderr, which closes after it
        logging.getLogger().handlers[:] = handlers
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert code != 0
    assert len(lines) == 1 and message in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not out.exists() and not (tmp_path / "cache").exists()
