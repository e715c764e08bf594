"""Per-step cost of RAN against plain LoRA, PGD-10 and TRADES-10 adversarial training, and against the same step
built on torchattacks; plus the peak memory of a RAN step with a ~100M-parameter CLIP-style model in 4-bit vs fp32.

    python benchmarks/step_cost.py --out step_cost.json [--quick]
"""

from __future__ import annotations

import ran_peft  # noqa: F401  (first: it keeps bitsandbytes' import-time Hub-kernel notice out of the output)

# isort: split

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import CLIPConfig, CLIPModel

from ran_peft import PixelBox, RANConfig, detect_family, ran_loss

MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
BOX = PixelBox(MEAN, STD)
EPSILON = 4 / 255


def clip_config(
    hidden: int, layers: int, image_size: int, patch: int, text_hidden: int | None = None
) -> CLIPConfig:
    text_hidden = text_hidden or hidden
    return CLIPConfig(
        text_config=dict(
            vocab_size=1000,
            hidden_size=text_hidden,
            intermediate_size=4 * text_hidden,
            num_attention_heads=max(1, text_hidden // 64),
            num_hidden_layers=layers,
            max_position_embeddings=32,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_attention_heads=max(1, hidden // 64),
            num_hidden_layers=layers,
            image_size=image_size,
            patch_size=patch,
        ),
        projection_dim=min(hidden, 256),
    )


def make_batch(batch: int, image_size: int, classes: int = 5, seed: int = 0) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.rand(batch, 3, image_size, image_size, generator=generator)
    pixels = BOX.from_pixels(raw)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    prompts = torch.randint(3, 1000, (classes, 12), generator=generator)
    prompts[:, -1] = 2  # EOS, where CLIP's text tower pools
    return {"pixel_values": pixels, "labels": labels}, {"input_ids": prompts}


RECIPES = {
    "lora": dict(epsilon=0.0, kl_weight=0.0),
    "ran": dict(),  # the RANConfig defaults
    "ran_k2": dict(attack_steps=2),
    "pgd10": dict(attack_steps=10, free_start=False, adversarial_weight=1.0, kl_weight=0.0),
    "trades10": dict(
        attack_steps=10,
        free_start=False,
        adversarial_weight=0.0,
        kl_weight=6.0,
        attack_loss="kl",
        step_size=EPSILON / 4,
    ),
}


def build(recipe: dict, config: CLIPConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = CLIPModel(config)
    ran_config = RANConfig(r=8, target_modules=["q_proj", "v_proj"], **{"epsilon": EPSILON, **recipe})
    return get_peft_model(model, ran_config), ran_config


def time_steps(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ran_step_fn(model, config, inputs, prompts):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    family = detect_family(model, prompts)
    model.train()

    def step():
        output = ran_loss(model, inputs, config, pixel_box=BOX, family=family)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def torchattacks_step_fn(model, config, inputs, prompts):
    """The default RAN step written the way a user would with torchattacks.PGD (equal K, same loss terms)."""
    import torchattacks

    class Logits(torch.nn.Module):  # torchattacks wants (N, C, H, W) in [0, 1] -> logits
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, pixels01):
            normalised = BOX.from_pixels(pixels01)
            return self.clip(pixel_values=normalised, **prompts).logits_per_image

    wrapped = Logits(model)
    attack = torchattacks.PGD(
        wrapped,
        eps=config.epsilon,
        alpha=config.resolved_step_size,
        steps=config.attack_steps,
        random_start=True,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    labels = inputs["labels"]
    pixels01 = BOX.to_pixels(inputs["pixel_values"]).clamp(0, 1)
    mix = config.adversarial_weight
    model.train()

    def step():
        adversarial01 = attack(pixels01, labels)
        model.train()
        clean_logits = wrapped(pixels01)
        adversarial_logits = wrapped(adversarial01)
        loss = (1 - mix) * F.cross_entropy(clean_logits, labels) + mix * F.cross_entropy(
            adversarial_logits, labels
        )
        loss = loss + config.kl_weight * F.kl_div(
            adversarial_logits.log_softmax(-1),
            clean_logits.log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_steps(args) -> dict:
    config = clip_config(args.hidden, args.layers, args.image_size, args.patch)
    inputs, prompts = make_batch(args.batch, args.image_size)
    seconds = {}
    for name, recipe in RECIPES.items():
        model, ran_config = build(recipe, config)
        seconds[name] = time_steps(ran_step_fn(model, ran_config, inputs, prompts), args.warmup, args.repeats)
        print(f"{name:>12}: {seconds[name] * 1000:8.1f} ms/step", flush=True)
    model, ran_config = build(RECIPES["ran"], config)
    seconds["torchattacks_equal_k"] = time_steps(
        torchattacks_step_fn(model, ran_config, inputs, prompts), args.warmup, args.repeats
    )
    print(f"{'torchattacks':>12}: {seconds['torchattacks_equal_k'] * 1000:8.1f} ms/step", flush=True)
    parameters = sum(p.numel() for p in CLIPModel(config).parameters())
    lora = seconds["lora"]
    return {
        "ran_over_lora_step_ratio": seconds["ran"] / lora,
        "ran_k2_over_lora_step_ratio": seconds["ran_k2"] / lora,
        "pgd10_over_lora_step_ratio": seconds["pgd10"] / lora,
        "trades10_over_lora_step_ratio": seconds["trades10"] / lora,
        "ran_over_torchattacks_equal_k_ratio": seconds["ran"] / seconds["torchattacks_equal_k"],
        "step_seconds_median": seconds,
        "timing_model": {
            "parameters": parameters,
            "hidden": args.hidden,
            "layers": args.layers,
            "image_size": args.image_size,
            "patch": args.patch,
            "batch": args.batch,
            "lora_rank": 8,
            "warmup_steps": args.warmup,
            "timed_steps": args.repeats,
        },
    }


# -- memory: each case in a fresh process, peak RSS above the process's own baseline ----------------------------

MEMORY_CHILD = """
import json, resource, sys, torch
from transformers import BitsAndBytesConfig, CLIPModel
from peft import get_peft_model, prepare_model_for_kbit_training
import importlib.util
spec = importlib.util.spec_from_file_location("step_cost", {script!r})
step_cost = importlib.util.module_from_spec(spec); spec.loader.exec_module(step_cost)
BOX, RANConfig, make_batch, ran_loss = step_cost.BOX, step_cost.RANConfig, step_cost.make_batch, step_cost.ran_loss
torch.manual_seed(0)
inputs, prompts = make_batch({batch}, {image_size})
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kwargs = {{}}
if {four_bit}:
    kwargs = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                  bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
model = CLIPModel.from_pretrained({path!r}, **kwargs)
if {four_bit}:
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
config = RANConfig(r=8, target_modules=["q_proj", "v_proj"])
model = get_peft_model(model, config).train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
from ran_peft import detect_family
family = detect_family(model, prompts)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
loaded_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open("/proc/self/clear_refs", "w") as handle:  # reset the high-water mark: measure the steps alone
    handle.write("5")
before_steps = status("VmRSS:")
for _ in range(2):
    ran_loss(model, inputs, config, pixel_box=BOX, family=family).loss.backward()
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
print(json.dumps({{"peak_kib_above_baseline": max(loaded_peak, status("VmHWM:")) - baseline,
                  "step_peak_kib_above_baseline": status("VmHWM:") - baseline,
                  "resident_kib_before_steps": before_steps - baseline}}))
"""


def measure_memory(args) -> dict:
    config = clip_config(768, 8, 224, 16, text_hidden=512)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = CLIPModel(config)
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder, safe_serialization=True)
        del model
        results, with_loading = {}, {}
        for name, four_bit in (("fp32", False), ("nf4", True)):
            code = MEMORY_CHILD.format(
                script=os.path.abspath(__file__),
                batch=args.memory_batch,
                image_size=224,
                four_bit=four_bit,
                path=folder,
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"memory case {name} failed:\n{done.stderr[-3000:]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            results[name] = measured["step_peak_kib_above_baseline"] / 1024
            with_loading[name] = measured["peak_kib_above_baseline"] / 1024
            print(
                f"{name:>12}: step peak {results[name]:8.1f} MiB, with loading {with_loading[name]:8.1f} MiB",
                flush=True,
            )
    return {
        "qlora4bit_over_fp32_memory_ratio": results["nf4"] / results["fp32"],
        "memory_peak_mib": results,
        "memory_peak_with_loading_mib": with_loading,
        "qlora4bit_over_fp32_memory_ratio_with_loading": with_loading["nf4"] / with_loading["fp32"],
        "memory_model": {"parameters": parameters, "image_size": 224, "batch": args.memory_batch, "steps": 2},
        "memory_method": "a fresh process per case loads the saved model (fp32, or 4-bit nf4 through bitsandbytes), "
        "wraps it with RANConfig defaults and runs two RAN training steps; the ratio uses the peak RSS (VmHWM, reset "
        "through /proc/self/clear_refs after loading) during the steps, above the process's RSS after imports and "
        "batch creation; `..._with_loading` uses the whole-process peak (ru_maxrss), which includes loading.",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="a small model and few steps (a smoke run)")
    parser.add_argument(
        "--skip-memory", action="store_true", help="skip the 4-bit vs fp32 memory measurement"
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--memory-batch", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.image_size, args.batch, args.warmup, args.repeats = 64, 2, 32, 8, 1, 3
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "torch_version": torch.__version__,
        "epsilon": EPSILON,
        "recipes": {name: {**RANConfig().recipe_dict(), **recipe} for name, recipe in RECIPES.items()},
    }
    results.update(measure_steps(args))
    if not args.skip_memory:
        results.update(measure_memory(args))
    results["peak_rss_mib_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2, sort_keys=True, default=str)
    print(json.dumps({k: v for k, v in results.items() if k.endswith("ratio")}, indent=2))


if __name__ == "__main__":
    main()
