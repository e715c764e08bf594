"""Loading adapters safely: safetensors only, clear errors for damaged files and for adapters of another base
model, and no `trust_remote_code=True` default anywhere in the package or its examples."""

import ast
import json
import shutil
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from transformers import ViTConfig, ViTForImageClassification

from ran_peft import RANConfig
from ran_peft.hub import AdapterLoadError, load_adapter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved_adapter(tmp_path):
    case = tm.vit()
    config = RANConfig(
        r=4, target_modules=case.target_modules, modules_to_save=case.modules_to_save, kl_weight=0.25
    )
    model = get_peft_model(case.model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    model.save_pretrained(tmp_path / "adapter")
    return case, model, tmp_path / "adapter"


def _vit(layers=2):
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(**{**tm._VISION, "num_hidden_layers": layers}, num_labels=3))


def test_load_adapter_restores_the_recipe_and_the_outputs(saved_adapter):
    case, model, folder = saved_adapter
    model.eval()
    loaded = load_adapter(tm.vit().model, folder).eval()
    assert loaded.peft_config["default"].kl_weight == 0.25
    with torch.no_grad():
        assert torch.equal(loaded(**case.batch).logits, model(**case.batch).logits)


def test_a_pickle_only_adapter_is_refused(saved_adapter):
    _, model, folder = saved_adapter
    weights = __import__("safetensors.torch").torch.load_file(folder / "adapter_model.safetensors")
    torch.save(weights, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterLoadError, match=r"holds only adapter_model\.bin, a pickle file"):
        load_adapter(tm.vit().model, folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_weights_file_is_an_error_naming_the_file(saved_adapter, damage):
    _, _, folder = saved_adapter
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file" * 4, "empty": b""}[damage]
    )
    with pytest.raises(AdapterLoadError, match="corrupted or truncated") as error:
        load_adapter(tm.vit().model, folder)
    assert str(path) in str(error.value)
    # Stock PEFT, for the record: safetensors' own error, which names no file.
    with pytest.raises(SafetensorError) as stock:
        PeftModel.from_pretrained(tm.vit().model, folder)
    assert str(path) not in str(stock.value)


@pytest.mark.parametrize(
    "base, expected",
    [
        (lambda: _vit(layers=1), "unexpected adapter weights.*layers\\.1\\."),  # stock PEFT: silently dropped
        (lambda: _vit(layers=3), "missing adapter weights.*layers\\.2\\."),  # stock PEFT: a warning only
        (lambda: tm.convnext().model, "targets modules .* does not have"),
    ],
)
def test_an_adapter_for_another_base_model_is_refused_by_name(saved_adapter, base, expected):
    _, _, folder = saved_adapter
    with pytest.raises(AdapterLoadError, match=expected):
        load_adapter(base(), folder)


def test_strict_false_keeps_stock_peft_behaviour(saved_adapter):
    _, _, folder = saved_adapter
    with pytest.warns(UserWarning, match="Found missing adapter keys"):
        model = load_adapter(_vit(layers=3), folder, strict=False)
    assert isinstance(model.peft_config["default"], RANConfig)


def test_a_config_from_a_newer_version_loads_with_a_warning(saved_adapter):
    case, model, folder = saved_adapter
    recipe = json.loads((folder / "ran_config.json").read_text())
    recipe.update(ran_peft_version="9.0.0", a_future_knob=3)
    (folder / "ran_config.json").write_text(json.dumps(recipe))
    with pytest.warns(UserWarning, match="a_future_knob"):
        loaded = load_adapter(tm.vit().model, folder)
    assert loaded.peft_config["default"].kl_weight == 0.25


def test_an_adapter_folder_without_weights_is_an_error(saved_adapter, tmp_path):
    _, _, folder = saved_adapter
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(folder / "adapter_config.json", empty)
    with pytest.raises(AdapterLoadError, match="holds no adapter_model.safetensors"):
        load_adapter(tm.vit().model, empty)


def _remote_code_defaults(source: str) -> list[int]:
    """Lines where `trust_remote_code` is True without the caller asking: a default, a keyword or a dict entry."""
    tree = ast.parse(source)
    conditional = {id(node.body) for node in ast.walk(tree) if isinstance(node, ast.IfExp)}
    lines = []

    def is_true(node):
        return isinstance(node, ast.Constant) and node.value is True

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            arguments = node.args
            positional = arguments.posonlyargs + arguments.args
            pairs = list(
                zip(positional[len(positional) - len(arguments.defaults) :], arguments.defaults, strict=True)
            )
            pairs += [
                (arg, default)
                for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
                if default
            ]
            lines += [
                default.lineno
                for arg, default in pairs
                if arg.arg == "trust_remote_code" and is_true(default)
            ]
        elif isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and is_true(node.value):
            lines.append(node.value.lineno)
        elif isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "trust_remote_code":
            lines += [node.lineno] if node.value is not None and is_true(node.value) else []
        elif isinstance(node, ast.Dict) and id(node) not in conditional:
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and is_true(value):
                    lines.append(value.lineno)
    return lines


def test_trust_remote_code_is_never_on_by_default():
    sources = [*sorted((ROOT / "ran_peft").rglob("*.py")), *sorted((ROOT / "kernels").rglob("*.py"))]
    sources += sorted((ROOT / "examples").rglob("*.py")) if (ROOT / "examples").is_dir() else []
    assert len(sources) > 5
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sources
        for line in _remote_code_defaults(path.read_text())
    ]
    assert not offenders, offenders
    # The scan does find each way of turning it on ...
    for sneaky in (
        "def load(name, trust_remote_code=True): ...",
        "def load(name, *, trust_remote_code: bool = True): ...",
        "AutoModel.from_pretrained(name, trust_remote_code=True)",
        "class Options:\n    trust_remote_code: bool = True",
        "options = {'trust_remote_code': True}",
    ):
        assert _remote_code_defaults(sneaky), sneaky
    # ... and accepts passing the user's own choice on.
    assert not _remote_code_defaults("options = {'trust_remote_code': True} if trust_remote_code else {}")
    assert not _remote_code_defaults("def load(name, trust_remote_code: bool = False): ...")
