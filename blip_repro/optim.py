"""AdamW parameter groups (weight decay as each paper's code, layer-wise LR decay for the ViT) and the LR schedules.

Used by the one training loop, blip_repro.train; every number here cites shared/reference/protocols.md.
"""
from __future__ import annotations

import math

import torch


def vit_lr_scale(name: str, n_layers: int, decay: float) -> float:
    """LR multiplier of a parameter under layer-wise decay of the vision encoder (protocols.md §2.4-§2.6).

    LAVIS `get_optimizer_params` with EVA's `get_num_layer`: embeddings are layer 0, block i is layer i+1, and what
    follows the blocks (HF `post_layernorm` = LAVIS `ln_vision`, outside the ViT there) is layer n+1; the multiplier
    is decay ** (n + 1 - layer), so the last block learns at lr * decay and the patch embedding at lr * decay**(n+1).
    Parameters outside `vision_model` keep the full LR.
    """
    if decay == 1.0 or not name.startswith("vision_model."):
        return 1.0
    rest = name[len("vision_model."):]
    if rest.startswith("embeddings."):
        layer = 0
    elif rest.startswith("encoder.layers."):
        layer = int(rest.split(".")[2]) + 1
    else:
        layer = n_layers + 1
    return decay ** (n_layers + 1 - layer)


def param_groups(model, lr: float, weight_decay: float, layer_decay: float = 1.0,
                 decay_1d: bool = True) -> list[dict]:
    """AdamW groups of the trainable parameters, one per (LR multiplier, weight decay).

    `decay_1d`: BLIP decays every parameter (`AdamW(model.parameters(), weight_decay=0.05)` in train_caption.py);
    LAVIS (BLIP-2) exempts 1-D parameters and biases (protocols.md §1.8, §2.4).
    """
    vision = getattr(model, "vision_model", None)
    n_layers = len(vision.encoder.layers) if vision is not None and hasattr(vision, "encoder") else 0
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = not decay_1d and (p.ndim < 2 or name.endswith(".bias"))
        scale = vit_lr_scale(name, n_layers, layer_decay)
        g = groups.setdefault((scale, exempt), {"params": [], "names": [], "lr": lr * scale, "lr_scale": scale,
                                                "weight_decay": 0.0 if exempt else weight_decay})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay, betas (0.9, 0.999) as BLIP and BLIP-2 fine-tuning (protocols.md §2.4)."""
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def lr_multiplier(schedule: str, total: int, steps_per_epoch: int, warmup_steps: int = 0,
                  warmup_ratio: float = 0.0, min_ratio: float = 0.0):
    """Step -> multiplier of each group's LR.

    Linear warm-up from `warmup_ratio` over `warmup_steps`, then
    - epoch_cosine: constant within an epoch, cosine over epochs to `min_ratio` (BLIP `cosine_lr_schedule`, and
      LAVIS `linear_warmup_cosine_lr`, whose cosine is also per epoch after a first-epoch warm-up; §1.8, §2.4);
    - cosine: cosine per step from the end of the warm-up to `total` (the tiny models' recipe);
    - constant.
    """
    def f(step: int) -> float:
        if step < warmup_steps:
            return warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "epoch_cosine":
            epochs = max(1, math.ceil(total / steps_per_epoch))
            t = (step // steps_per_epoch) / epochs
        else:
            t = (step - warmup_steps) / max(1, total - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


SCHEDULES = ("cosine", "epoch_cosine", "constant")
