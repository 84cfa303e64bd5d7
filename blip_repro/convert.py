"""Original BLIP `.pth` checkpoints (salesforce/BLIP README links) -> Hugging Face BLIP state dicts and folders.

Covers the captioning (`BLIP_Decoder`), retrieval (`BLIP_Retrieval`, `blip_itm`) and VQA (`BLIP_VQA`) checkpoints,
and the pre-trained ones (`model_base*.pth`, loaded into any of those heads: the missing head is reported). The
original ViT is timm-style (`visual_encoder.blocks.N.attn.qkv`), the text side already uses BERT names that HF's BLIP
text classes kept. Momentum encoders, queues and the temperature (training-only) are dropped and listed.
Position embeddings are interpolated when the checkpoint's image size differs (BLIP `interpolate_pos_embed`).

    blip-repro convert model_base_caption_capfilt_large.pth --like blip-base-caption --out models/blip-capfilt
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from blip_repro.errors import UserError

# original ViT (models/vit.py) -> HF BlipVisionModel, applied to the name after "visual_encoder."
_VISION = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
# training-only state of the original models (momentum distillation, queues, learnable temperature)
_DROP = re.compile(r"(_m\.|_m$|queue|^temp$|ptr_queue)")


def rename(key: str) -> str | None:
    """HF name of one original parameter, or None for training-only state."""
    head = key.split(".", 1)[0]
    if _DROP.search(head) or _DROP.search(key):
        return None
    if head == "visual_encoder":
        rest = key.split(".", 1)[1]
        for pattern, repl in _VISION:
            if re.search(pattern, rest):
                return "vision_model." + re.sub(pattern, repl, rest)
        raise UserError(f"unexpected vision parameter {key!r} in the checkpoint")
    return key  # text_encoder.*, text_decoder.*, vision_proj, text_proj, itm_head: same names in HF


def _interpolate_pos(pos: torch.Tensor, n_target: int) -> torch.Tensor:
    """Bicubic resize of the patch-grid position embeddings (the class token's is kept), as BLIP does on load."""
    n_src = pos.shape[1] - 1
    if n_src == n_target - 1:
        return pos
    s, t = int(math.isqrt(n_src)), int(math.isqrt(n_target - 1))
    grid = pos[:, 1:].reshape(1, s, s, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid.float(), size=(t, t), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, t * t, -1).to(pos.dtype)], dim=1)


def convert_state_dict(original: dict, model) -> tuple[dict, dict]:
    """(HF state dict for `model`, report {"dropped", "missing", "unexpected"}). Shapes are checked."""
    target = model.state_dict()
    out, dropped = {}, []
    for k, v in original.items():
        new = rename(k)
        if new is None:
            dropped.append(k)
            continue
        if new == "vision_model.embeddings.position_embedding" and new in target:
            v = _interpolate_pos(v, target[new].shape[1])
        out[new] = v
    unexpected = sorted(k for k in out if k not in target)
    for k in list(out):
        if k in target and out[k].shape != target[k].shape:
            raise UserError(f"checkpoint parameter for {k} has shape {tuple(out[k].shape)}, the model expects "
                            f"{tuple(target[k].shape)}: is --like the right model size?")
    missing = sorted(k for k in target if k not in out and not k.endswith("position_ids"))
    return out, {"dropped": dropped, "missing": missing, "unexpected": unexpected}


def load_original(path: str | Path) -> dict:
    """The state dict inside an original checkpoint file, read with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found (the BLIP README links the .pth files)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for pickles it refuses
        raise UserError(f"{path}: cannot be read with weights_only=True ({type(e).__name__}); it may hold "
                        f"arbitrary Python objects - re-save its 'model' state dict from a trusted environment") from None
    return ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt


def convert(path: str | Path, like: str, out: str | Path, allow_missing: bool = False) -> Path:
    """Convert an original checkpoint into an HF folder with the config and processor of the zoo model `like`."""
    from blip_repro import zoo

    model, processor = zoo.load_model(like, device="cpu", dtype="float32")
    state, report = convert_state_dict(load_original(path), model)
    if report["unexpected"]:
        raise UserError(f"{path}: parameters {report['unexpected'][:3]} have no place in {type(model).__name__}; "
                        f"choose a --like model with the same head")
    if report["missing"] and not allow_missing:
        raise UserError(f"{path}: no weights for {len(report['missing'])} parameters of {type(model).__name__} "
                        f"(first: {report['missing'][0]}); a pre-trained checkpoint has no task head: pass "
                        f"--allow-missing to keep the randomly initialised head for fine-tuning")
    model.load_state_dict(state, strict=False)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
