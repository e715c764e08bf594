import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this when first imported (peft, transformers and bitsandbytes import it): set it before them all.
os.environ.setdefault("TRITON_INTERPRET", "1")
# `python -m pytest` keeps the repository root on the import path, as users' own processes do: no folder there may
# pass for an installed package (tests/test_import_path.py).
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one thread is faster than two threads spin-waiting for a shared core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP (32 px, width 32) with the offline processor, saved as a folder scripts can load."""
    from transformers import CLIPModel

    from ran_peft.pretrain import offline_processor, small_clip_config

    folder = tmp_path_factory.mktemp("tiny-clip")
    processor = offline_processor(image_size=32)
    torch.manual_seed(0)
    model = CLIPModel(small_clip_config(processor.tokenizer, image_size=32, width=32))
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_generative_default(tmp_path_factory):
    """The generative default's build at a tiny size (a tiny random CLIP's vision tower, a 1-layer language model,
    a few pre-training steps): a real `LlavaForConditionalGeneration` folder with the default's processor."""
    from transformers import CLIPModel

    from ran_peft.pretrain import offline_processor, small_clip_config
    from ran_peft.pretrain_llava import GenerativeDefaultSettings, build_default_llava

    root = tmp_path_factory.mktemp("tiny-generative")
    processor = offline_processor(image_size=32)
    torch.manual_seed(0)
    clip = CLIPModel(small_clip_config(processor.tokenizer, image_size=32, width=32))
    clip.save_pretrained(root / "clip", safe_serialization=True)
    processor.save_pretrained(root / "clip")
    settings = GenerativeDefaultSettings(
        hidden_size=32,
        layers=1,
        heads=2,
        intermediate_size=64,
        image_rows=64,
        alignment_steps=4,
        instruction_steps=4,
        batch_size=16,
    )
    return build_default_llava(root / "llava", vision_model=root / "clip", settings=settings, progress=False)
