"""open_clip models (BiomedCLIP's shape: a timm ViT and a Hugging Face BERT text tower) train with RAN through the
stock Trainer, and their adapter reloads onto the bare model in stock peft with identical outputs.

The tests that build an open_clip model need open-clip-torch and a torchvision that imports beside torch; CI runs
them in a second environment (`.ci/run`). The error tests need neither."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, Trainer, TrainingArguments

from ran_peft import RANCallback, RANConfig, UnsupportedModelError, detect_family
from ran_peft.open_clip import OpenCLIPFamily, load_open_clip, open_clip_pixel_box
from ran_peft.text import build_word_tokenizer, synthetic_vocabulary
from ran_peft.training import resolve_pixel_box

try:
    import open_clip
except Exception as error:  # absent, or torchvision does not import beside this torch
    open_clip = None
    MISSING = (
        f"open_clip does not import here ({type(error).__name__}: {error}): `pip install 'ran-peft[open_clip]'` "
        "beside a matching torch/torchvision pair; CI runs these in .ci/run's second venv"
    )
else:
    MISSING = ""

# Not open_clip's default (OpenAI's) normalisation: the box must come from this model's own config.
MEAN, STD = (0.45, 0.4, 0.35), (0.2, 0.25, 0.3)
TEXT_LENGTH = 12
TARGETS = ["qkv", "query", "value"]  # timm ViT attention, BERT self-attention


def _write_model_folder(folder) -> str:
    """A BiomedCLIP-shaped open_clip model folder at test size, laid out as BiomedCLIP's Hub repo is
    (`open_clip_config.json` with `model_cfg` and `preprocess_cfg`): a timm ViT image tower and a Hugging Face BERT
    text tower (`cls_last_hidden_state_pooler`, MLP projection) from a local tiny `BertConfig`. Returns the
    `local-dir:` model name open_clip loads it by."""
    bert = folder / "tiny-bert"
    tokenizer = build_word_tokenizer(synthetic_vocabulary(), max_length=TEXT_LENGTH)
    BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=TEXT_LENGTH,
        pad_token_id=0,
    ).save_pretrained(bert)
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "timm_model_name": "test_vit",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 160,
        },
        "text_cfg": {
            "hf_model_name": str(bert),
            "hf_tokenizer_name": str(bert),  # a `local-dir:` model's tokenizer is read from its own folder
            "hf_model_pretrained": False,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": TEXT_LENGTH,
        },
    }
    preprocess_cfg = {"mean": list(MEAN), "std": list(STD)}
    model_dir = folder / "tiny-biomedclip"
    model_dir.mkdir()
    tokenizer.save_pretrained(model_dir)  # as BiomedCLIP's Hub repo holds its tokenizer files
    (model_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
    )
    name = f"local-dir:{model_dir}"
    torch.manual_seed(0)
    random = open_clip.create_model(name, pretrained_text=False)  # no weights yet: random towers
    save_file(
        {k: v.contiguous() for k, v in random.state_dict().items()}, model_dir / "open_clip_model.safetensors"
    )
    return name


def _bare_model(name: str):
    """The model as a user loads it: `open_clip.create_model` with the folder's weights."""
    return open_clip.create_model(name)


def _rows(n: int, seed: int, labels: bool = False) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(n, 3, 160, 160, generator=g) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(
        STD
    ).view(3, 1, 1)
    rows = {"pixel_values": pixels.numpy()}
    if labels:
        rows["labels"] = torch.randint(0, 3, (n,), generator=g).tolist()
    else:
        rows["input_ids"] = torch.randint(1, 64, (n, TEXT_LENGTH), generator=g).numpy()
    return datasets.Dataset.from_dict(rows).with_format("torch")


def _arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        remove_unused_columns=False,  # open_clip's forward names its inputs `image` and `text`
        label_names=["labels"],
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def _adapter(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


STOCK_RELOAD = textwrap.dedent(
    """
    import sys
    import open_clip, torch
    from peft import PeftModel
    from safetensors.torch import load_file
    torch.set_num_threads(1)
    name, adapter_dir, io_path = sys.argv[1:4]
    bare = open_clip.create_model(name)  # the bare model, as open_clip loads it
    data = load_file(io_path)
    bare.eval()
    with torch.no_grad():
        plain = bare.encode_image(data["image"], normalize=True)
    model = PeftModel.from_pretrained(bare, adapter_dir).eval()
    with torch.no_grad():
        image, text, scale = model(image=data["image"], text=data["text"])
    assert torch.equal(image, data["image_features"]), (image - data["image_features"]).abs().max()
    assert torch.equal(text, data["text_features"]), (text - data["text_features"]).abs().max()
    assert not torch.allclose(plain, image), "the adapter changed nothing: its keys did not load"
    assert not any(name.startswith("ran_peft") for name in sys.modules), "ran_peft was imported"
    print("identical")
    """
)


@pytest.mark.slow
@pytest.mark.open_clip
@pytest.mark.skipif(open_clip is None, reason=MISSING)
def test_biomedclip_shaped_open_clip_model_trains_with_ran_and_reloads_on_the_bare_model_in_stock_peft(
    tmp_path,
):
    name = _write_model_folder(tmp_path)
    bare = _bare_model(name)
    config = RANConfig(r=4, target_modules=TARGETS, epsilon=8 / 255, noise_warmup_steps=0)
    model = get_peft_model(bare, config)
    assert isinstance(detect_family(model), OpenCLIPFamily)
    before = _adapter(model)
    trainer = Trainer(
        model=model,
        args=_arguments(tmp_path),
        train_dataset=_rows(8, seed=1),
        callbacks=[RANCallback()],  # no processor: the pixel box is the model's own preprocessing config
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert entry["ran/adversarial"] > entry["ran/clean"]  # the attack raised the contrastive loss
        assert entry["ran/kl"] > 0
    after = _adapter(model)
    assert any(not torch.equal(before[name], after[name]) for name in before)

    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    keys = list(load_file(adapter_dir / "adapter_model.safetensors"))
    assert keys and all(k.startswith(("base_model.model.visual.", "base_model.model.text.")) for k in keys), (
        keys[:5]
    )
    batch = _rows(3, seed=3)[:]
    model.eval()
    with torch.no_grad():
        image, text, _ = model(image=batch["pixel_values"], text=batch["input_ids"])
    save_file(
        {
            "image": batch["pixel_values"].contiguous(),
            "text": batch["input_ids"].contiguous(),
            "image_features": image.contiguous(),
            "text_features": text.contiguous(),
        },
        tmp_path / "io.safetensors",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_RELOAD,
            name,
            str(adapter_dir),
            str(tmp_path / "io.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical" in result.stdout


@pytest.mark.slow
@pytest.mark.open_clip
@pytest.mark.skipif(open_clip is None, reason=MISSING)
def test_open_clip_prompt_classification_trains_and_evaluates_with_ran(tmp_path):
    bare = _bare_model(_write_model_folder(tmp_path))
    model = get_peft_model(
        bare, RANConfig(r=4, target_modules=TARGETS, epsilon=8 / 255, noise_warmup_steps=0)
    )
    prompts = {
        "input_ids": torch.randint(1, 64, (3, TEXT_LENGTH), generator=torch.Generator().manual_seed(5))
    }
    trainer = Trainer(
        model=model,
        args=_arguments(tmp_path, eval_strategy="steps", eval_steps=2, max_steps=2),
        train_dataset=_rows(8, seed=1, labels=True),
        eval_dataset=_rows(4, seed=2, labels=True),
        callbacks=[RANCallback(class_text_inputs=prompts)],
    )
    trainer.train()
    entry = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert entry["ran/adversarial"] > entry["ran/clean"]
    # Evaluation: cross-entropy over the 3 class prompts, through the same family, on the trained adapter.
    batch = _rows(4, seed=2, labels=True)[:]
    model.eval()
    with torch.no_grad():
        image, text, scale = model(image=batch["pixel_values"], text=prompts["input_ids"])
        expected = nn.functional.cross_entropy(scale * image @ text.t(), batch["labels"])
    evaluated = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evaluated == [pytest.approx(float(expected), rel=1e-5)]


@pytest.mark.open_clip
@pytest.mark.skipif(open_clip is None, reason=MISSING)
def test_open_clip_pixel_box_is_the_models_own_preprocessing(tmp_path):
    bare = _bare_model(_write_model_folder(tmp_path))
    model = get_peft_model(bare, RANConfig(r=4, target_modules=TARGETS))
    box = open_clip_pixel_box(model)
    assert box.mean == pytest.approx(MEAN) and box.std == pytest.approx(STD)
    assert resolve_pixel_box(RANConfig(target_modules=TARGETS), None, model) == box
    # The config's own image_mean/image_std still win.
    chosen = RANConfig(target_modules=TARGETS, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert resolve_pixel_box(chosen, None, model).mean == (0.5, 0.5, 0.5)


def test_unrecognised_model_error_names_open_clip_and_the_supported_families():
    with pytest.raises(UnsupportedModelError) as error:
        detect_family(nn.Linear(3, 3))
    message = str(error.value)
    assert "Linear cannot be trained with RAN" in message
    for family in ("open_clip", "BiomedCLIP", "ForImageClassification", "CLIPModel", "LLaVA", "Gemma 3"):
        assert family in message, family


def test_open_clip_like_model_without_preprocessing_config_says_what_is_missing():
    class HandMadeCLIP(nn.Module):  # open_clip's interface, made by hand: no `visual.preprocess_cfg`
        def __init__(self):
            super().__init__()
            self.visual = nn.Linear(4, 2)
            self.logit_scale = nn.Parameter(torch.zeros(()))

        def encode_image(self, image, normalize=False):
            return self.visual(image)

        def encode_text(self, text, normalize=False):
            return text

        def forward(self, image=None, text=None):
            return self.encode_image(image), self.encode_text(text), self.logit_scale.exp()

    with pytest.raises(
        UnsupportedModelError, match=r"model\.visual\.preprocess_cfg.*open_clip\.create_model"
    ):
        detect_family(HandMadeCLIP())


@pytest.mark.slow
@pytest.mark.open_clip
@pytest.mark.skipif(open_clip is None, reason=MISSING)
def test_finetune_example_trains_an_open_clip_model_by_its_open_clip_name(tmp_path):
    """`examples/finetune.py --model hf-hub:microsoft/BiomedCLIP-...` offline: the same loader with `local-dir:`
    (open_clip's model, transform and tokenizer; BiomedCLIP's target modules by default)."""
    name = _write_model_folder(tmp_path)
    model, processor = load_open_clip(name)
    assert processor.image_processor.image_mean == pytest.approx(MEAN)
    assert processor.tokenizer(["a ct scan"])["input_ids"].shape == (1, TEXT_LENGTH)
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(Path(__file__).parents[1] / "examples" / "finetune.py"),
        *("--model", name, "--max-steps", "2", "--batch-size", "4", "--train-size", "8", "--eval-size", "4"),
        *("--eval-attack-steps", "1", "--eval-epsilons", "4/255", "--no-progress", "--output-dir", str(out)),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "ran_metrics.json").read_text())
    assert set(metrics["runs"]) == {"before", "ran"}
    assert "ran/adversarial" in metrics["train_log"][-1]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["qkv", "query", "value"]
