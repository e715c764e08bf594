"""FSDP2 (`fully_shard`) on CPU with gloo: RAN trains with free_start=False and refuses free_start=True clearly."""

import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tiny_models as tm
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard

from ran_peft import PixelBox, RANConfig, ran_loss

store = dist.FileStore(tempfile.mktemp(), 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
case = tm.convnext()
model = get_peft_model(
    case.model,
    RANConfig(
        r=4, target_modules=case.target_modules, modules_to_save=case.modules_to_save, free_start=False
    ),
)
fully_shard(model)
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
box = PixelBox(tm.MEAN, tm.STD)
model.train()
losses = []
for _ in range(2):
    out = ran_loss(model, case.batch, model.peft_config["default"], pixel_box=box)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(float(out.loss.detach()))
cfg = model.peft_config["default"]
cfg.free_start = True
refused = False
try:
    ran_loss(model, case.batch, cfg, pixel_box=box)
except ValueError as e:
    refused = "free_start=False" in str(e)
dist.destroy_process_group()
assert all(loss == loss for loss in losses) and losses[1] < losses[0], losses
assert refused
print("fsdp2 ok", losses)
