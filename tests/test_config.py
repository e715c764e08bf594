import json
import warnings

import pytest
from peft import LoraConfig, PeftType

from ran_peft import RAN_CONFIG_NAME, RANConfig


def test_ran_config_is_a_lora_config_with_recipe_defaults():
    config = RANConfig(r=4, target_modules=["q_proj"])
    assert isinstance(config, LoraConfig)
    assert config.peft_type == PeftType.LORA
    assert config.epsilon == pytest.approx(4 / 255)
    assert config.resolved_step_size == pytest.approx(1.25 * 4 / 255)
    assert RANConfig(attack_steps=10).resolved_step_size == pytest.approx(2.5 * (4 / 255) / 10)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("epsilon", -1, "[0, 1] pixel units"),
        ("epsilon", 8, "[0, 1] pixel units"),
        ("epsilon", float("nan"), "[0, 1] pixel units"),
        ("step_size", -0.1, "pixel units"),
        ("attack_steps", 0, "integer >= 1"),
        ("attack_steps", 1.5, "integer >= 1"),
        ("attack_norm", "l3", "'linf' or 'l2'"),
        ("attack_loss", "ce", "'task', 'kl' or 'consistency'"),
        ("adversarial_weight", 1.5, "[0.0, 1.0]"),
        ("kl_weight", -0.5, "a number in"),
        ("task_weight", -1.0, "a number in"),
        ("reference_kl_weight", float("nan"), "a number in"),
        ("kl_temperature", 0, "temperature > 0"),
        ("consistency_weight", float("inf"), "a number in"),
        ("noise_warmup_steps", -3, "integer >= 0"),
        ("free_start", "yes", "True or False"),
        ("image_std", [0.5, 0.0, 0.5], "positive"),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(field, value, allowed):
    kwargs = {field: value}
    if field == "image_std":
        kwargs["image_mean"] = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError) as error:
        RANConfig(**kwargs)
    message = str(error.value)
    assert f"RANConfig.{field}=" in message
    assert repr(value) in message or str(value) in message
    assert allowed in message


def test_image_mean_needs_image_std():
    with pytest.raises(ValueError, match="image_std"):
        RANConfig(image_mean=[0.5])


def test_warmup_ramps_linearly_to_one():
    config = RANConfig(noise_warmup_steps=4)
    assert [config.ramp(step) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert RANConfig().ramp(0) == 1.0


def test_save_writes_plain_lora_config_and_recipe_beside_it(tmp_path):
    config = RANConfig(r=4, target_modules=["q_proj"], epsilon=2 / 255, attack_steps=3, kl_weight=0.7)
    config.save_pretrained(tmp_path)
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert "epsilon" not in adapter_config and "kl_weight" not in adapter_config
    recipe = json.loads((tmp_path / RAN_CONFIG_NAME).read_text())
    assert recipe["epsilon"] == pytest.approx(2 / 255) and recipe["attack_steps"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stock PEFT must see no unknown key
        stock = LoraConfig.from_pretrained(tmp_path)
    assert type(stock) is LoraConfig and stock.r == 4

    restored = RANConfig.from_pretrained(str(tmp_path))
    assert isinstance(restored, RANConfig)
    assert restored.recipe_dict() == config.recipe_dict()
    assert restored.r == 4 and set(restored.target_modules) == {"q_proj"}


def test_unknown_recipe_keys_from_a_newer_version_are_dropped_with_a_warning(tmp_path):
    RANConfig(r=2, target_modules=["q_proj"], kl_weight=0.3).save_pretrained(tmp_path)
    recipe = json.loads((tmp_path / RAN_CONFIG_NAME).read_text())
    recipe["hyperbolic_rectifier"] = 3
    (tmp_path / RAN_CONFIG_NAME).write_text(json.dumps(recipe))
    with pytest.warns(UserWarning, match="hyperbolic_rectifier"):
        restored = RANConfig.from_pretrained(str(tmp_path))
    assert restored.kl_weight == pytest.approx(0.3)


def test_plain_lora_adapter_loads_with_default_recipe_and_a_warning(tmp_path):
    LoraConfig(r=2, target_modules=["q_proj"]).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="plain LoRA adapter"):
        restored = RANConfig.from_pretrained(str(tmp_path))
    assert restored.epsilon == RANConfig().epsilon and restored.r == 2


def test_corrupt_recipe_file_is_a_clear_error(tmp_path):
    RANConfig(r=2, target_modules=["q_proj"]).save_pretrained(tmp_path)
    (tmp_path / RAN_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RANConfig.from_pretrained(str(tmp_path))
