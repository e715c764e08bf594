"""Saving adapters with their model card, pushing with the network boundary replaced, loading by repo id offline."""

import json
import shutil
from pathlib import Path

import pytest
import tiny_models as tm
import torch
import yaml
from huggingface_hub import ModelCard, constants
from peft import PeftModel, get_peft_model

from ran_peft import RANConfig
from ran_peft import hub as ran_hub

METRICS = {
    "attack": {"name": "pgd", "steps": 20, "restarts": 1},
    "runs": {
        "before": {"clean_accuracy": 0.5, "robust_accuracy": {"1/255": 0.3, "4/255": 0.1}},
        "after": {"clean_accuracy": 0.8, "robust_accuracy": {"1/255": 0.7, "4/255": 0.5}},
    },
}


@pytest.fixture
def adapter_model(tmp_path):
    case = tm.vit()
    config = RANConfig(
        r=4, target_modules=case.target_modules, modules_to_save=case.modules_to_save, kl_weight=0.5
    )
    model = get_peft_model(case.model, config)
    config.base_model_name_or_path = str(tmp_path / "my-private-disk" / "base")  # a local path of the user
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    return case, model


def _front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_save_adapter_writes_everything_with_a_model_card(tmp_path, adapter_model):
    _, model = adapter_model
    folder = ran_hub.save_adapter(model, tmp_path / "out", metrics=METRICS, datasets=["synthetic-medical"])
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([*ran_hub.ADAPTER_FILES, "README.md", ran_hub.METRICS_NAME])
    card = (folder / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and "ran-peft" in meta["tags"]
    assert "base_model" not in meta or meta["base_model"] is None  # a local path is never published
    assert "my-private-disk" not in card
    assert "| after | 80.0 | 70.0 | 50.0 |" in card and "robust @ 4/255" in card
    assert "PGD with 20 steps and 1 random restart on the task loss" in card and "name=" not in card
    (result,) = meta["model-index"]
    assert [metric["value"] for metric in result["results"][0]["metrics"]] == [80.0, 70.0, 50.0]
    assert "kl_weight" in card
    assert json.loads((folder / ran_hub.METRICS_NAME).read_text()) == METRICS
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_save_adapter_never_overwrites_or_half_writes(tmp_path, adapter_model, monkeypatch):
    _, model = adapter_model
    folder = ran_hub.save_adapter(model, tmp_path / "out")
    before = (folder / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ran_hub.save_adapter(model, folder)

    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ran_hub, "model_card_text", broken_card)
    with pytest.raises(OSError, match="disk full"):
        ran_hub.save_adapter(model, folder, overwrite=True)
    with pytest.raises(OSError):
        ran_hub.save_adapter(model, tmp_path / "fresh")
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    assert not (tmp_path / "fresh").exists()
    assert not list(tmp_path.glob(".*tmp-*"))


class FakeHubApi:
    uploads: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        return repo_id

    def upload_folder(self, folder_path, repo_id, **kwargs):
        files = {p.name: p.read_bytes() for p in sorted(__import__("pathlib").Path(folder_path).iterdir())}
        FakeHubApi.uploads.append((repo_id, files))
        return type("Commit", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()


def test_push_uploads_a_complete_adapter_without_local_paths(tmp_path, adapter_model, monkeypatch):
    _, model = adapter_model
    folder = ran_hub.save_adapter(model, tmp_path / "out", metrics=METRICS)
    monkeypatch.setattr("huggingface_hub.HfApi", FakeHubApi)
    FakeHubApi.uploads.clear()
    url = ran_hub.push_adapter(folder, "someone/ran-adapter", token="hf_secret_token")
    assert url.endswith("/commit/1")
    ((repo_id, files),) = FakeHubApi.uploads
    assert repo_id == "someone/ran-adapter"
    assert set(files) == {*ran_hub.ADAPTER_FILES, "README.md", ran_hub.METRICS_NAME}
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] is None
    for content in files.values():
        assert b"hf_secret_token" not in content and b"my-private-disk" not in content
    assert files["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()
    # the card that reaches the Hub carries the robust accuracies where the Hub reads them
    (result,) = _front_matter(files["README.md"].decode())["model-index"]
    metrics = {metric["name"]: metric["value"] for metric in result["results"][0]["metrics"]}
    assert metrics == {
        "clean accuracy": 80.0,
        "robust accuracy, L-inf 1/255, PGD-20, 1 restart": 70.0,
        "robust accuracy, L-inf 4/255, PGD-20, 1 restart": 50.0,
    }


def test_failed_push_keeps_the_local_adapter_and_never_shows_the_token(tmp_path, adapter_model, monkeypatch):
    _, model = adapter_model
    folder = ran_hub.save_adapter(model, tmp_path / "out")

    class Refusing(FakeHubApi):
        def upload_folder(self, **kwargs):
            raise ConnectionError(f"401 for token {self.token}")

    monkeypatch.setattr("huggingface_hub.HfApi", Refusing)
    with pytest.raises(ran_hub.HubPushError) as error:
        ran_hub.push_adapter(folder, "someone/ran-adapter", token="hf_secret_token")
    message = str(error.value)
    assert (
        "hf_secret_token" not in message
        and "still saved locally" in message
        and str(folder.resolve()) in message
    )
    assert sorted(p.name for p in folder.iterdir()) == sorted([*ran_hub.ADAPTER_FILES, "README.md"])


def test_load_by_repo_id_offline_from_the_local_hub_cache(tmp_path, adapter_model, monkeypatch):
    case, model = adapter_model
    folder = ran_hub.save_adapter(model, tmp_path / "out")
    repo_id, commit = "someone/ran-adapter", "0" * 40
    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--someone--ran-adapter" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ran_hub.ADAPTER_FILES:
        shutil.copy(folder / name, snapshot / name)
    (cache / "models--someone--ran-adapter" / "refs").mkdir()
    (cache / "models--someone--ran-adapter" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    model.eval()
    with torch.no_grad():
        expected = model(**case.batch).logits
    stock = PeftModel.from_pretrained(tm.vit().model, repo_id).eval()
    restored = ran_hub.load_adapter(tm.vit().model, repo_id).eval()
    assert isinstance(restored.peft_config["default"], RANConfig)
    assert restored.peft_config["default"].kl_weight == 0.5
    with torch.no_grad():
        assert torch.equal(stock(**case.batch).logits, expected)
        assert torch.equal(restored(**case.batch).logits, expected)


COMMITTED_METRICS = (
    Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "finetune-default-ran_metrics.json"
)


def test_card_model_index_holds_the_robust_accuracies_of_ran_metrics_json():
    metrics = json.loads(COMMITTED_METRICS.read_text())
    config = RANConfig(r=8, target_modules=["q_proj", "v_proj"])
    text = ran_hub.model_card_text(
        config, base_model="openai/clip-vit-base-patch32", metrics=metrics, datasets=["synthetic"]
    )
    meta = _front_matter(text)
    assert meta["base_model"] == "openai/clip-vit-base-patch32"
    (entry,) = meta["model-index"]
    (result,) = entry["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"]["type"] == "synthetic"
    ran = metrics["runs"]["ran"]
    written = {metric["name"]: metric for metric in result["metrics"]}
    assert written["clean accuracy"]["value"] == round(100 * ran["clean_accuracy"], 1) == 85.0
    for budget, value in ran["robust_accuracy"].items():
        metric = written[
            f"robust accuracy, L-inf {budget}, AutoAttack-quick (APGD-CE, APGD-T, FAB-T, Square)"
        ]
        assert metric["type"] == "accuracy" and metric["value"] == round(100 * value, 1)
        assert metric["args"] == {
            "attack": "AutoAttack-quick",
            "norm": "linf",
            "epsilon": budget,
            "pixel_units": "[0, 1]",
            "num_samples": 300,
        }
    assert (
        written["robust accuracy, L-inf 4/255, AutoAttack-quick (APGD-CE, APGD-T, FAB-T, Square)"]["value"]
        == 19.3
    )
    # huggingface_hub reads the same results back
    results = ModelCard(text).data.eval_results
    assert len(results) == 1 + len(ran["robust_accuracy"])
    # the attack in one sentence, no dump of the attack's fields
    body = text.split("---\n", 2)[2]
    (sentence,) = [line for line in body.splitlines() if line.startswith("Robust accuracy is")]
    assert sentence.count(". ") == 0 and sentence.endswith(".")
    assert (
        "AutoAttack-quick" in sentence
        and "300 held-out samples" in sentence
        and "[0, 1] pixel units" in sentence
    )
    assert "description=" not in body and "version=" not in body


@pytest.mark.parametrize(
    ("base_model", "expected"),
    [
        ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
        (
            "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
            "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        ),
        ("local-dir:/data/models/biomedclip", None),
        ("/home/me/models/base", None),
        ("./base", None),
        (None, None),
    ],
)
def test_card_base_model_is_set_for_a_hub_id_only(base_model, expected):
    text = ran_hub.model_card_text(RANConfig(target_modules=["q_proj"]), base_model=base_model)
    meta = _front_matter(text)
    assert meta.get("base_model") == expected
    assert "model-index" not in meta  # no metrics, no results


def test_card_task_type_follows_the_model_family(tmp_path):
    case = tm.llava()
    model = get_peft_model(case.model, RANConfig(r=2, target_modules=case.target_modules))
    folder = ran_hub.save_adapter(model, tmp_path / "llava", metrics=METRICS)
    (result,) = _front_matter((folder / "README.md").read_text())["model-index"][0]["results"]
    assert result["task"]["type"] == "image-text-to-text"
