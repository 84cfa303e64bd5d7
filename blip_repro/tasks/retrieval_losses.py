"""Retrieval fine-tuning for the one training loop: ITC over the batch gathered from every rank + ITM on one positive
and two hard negatives per sample drawn from the similarities, as BLIP_Retrieval.forward (protocols.md §1.2) and
LAVIS blip2_qformer.forward (§2.6) compute them.

Left out, on purpose: BLIP's momentum encoder, 57,600-entry feature queue and momentum distillation (alpha 0.4) —
HF's retrieval classes carry no momentum weights, and the tiny models learn the shapes benchmark without them; the
learnable temperature (HF's retrieval classes have no `temp` parameter: it stays at BLIP's initial 0.07); BLIP-2's
ITG loss (Blip2ForImageTextRetrieval has no language-model head). Gathers go through blip_repro.dist, so the loss
runs with no process group at all (the original's single-GPU crash, §1.9), at world size 1 (negatives from the
local batch only) and under DDP (negatives from every rank, BLIP's `negative_all_rank=True`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from blip_repro import dist
from blip_repro.data import readers
from blip_repro.errors import UserError
from blip_repro.tasks import retrieval

TEMP = 0.07  # BLIP / BLIP-2 initial ITC temperature (configs: temp 0.07); fixed here, see the module docstring


def train_examples(cfg, processor) -> list[dict]:
    """Training pairs {"image", "caption", "image_index"}; captions of one image share its index (ITC positives)."""
    if cfg.dataset == "json":
        if not cfg.ann_file:
            raise UserError("dataset=json needs 'ann_file' (a JSON list of {image, caption}) and 'image_root'")
        recs = readers.read_caption_train(cfg.ann_file, cfg.image_root or ".", cfg.limit)
    else:
        if cfg.dataset not in retrieval.ANN_FILES:
            raise UserError(f"dataset {cfg.dataset!r} has no retrieval training split; valid: "
                            f"{', '.join(retrieval.ANN_FILES)} or json")
        images, anns = readers.dataset_paths(cfg.dataset)
        recs = readers.read_caption_train(anns / retrieval.ANN_FILES[cfg.dataset].format(split=cfg.split),
                                          cfg.image_root or images, cfg.limit)
    index: dict[str, int] = {}
    return [dict(r, image_index=index.setdefault(str(r["image"]), len(index))) for r in recs]


def train_batch_for(processor, examples: list[dict], cfg, family: str) -> dict:
    from blip_repro.tasks.captioning import _pixels  # the shared processed-image cache

    proto = retrieval.protocol_for(family, cfg.dataset)
    ids, mask = retrieval.tokenize(processor, [e["caption"] for e in examples], proto, "longest")
    itm_ids = ids.clone()
    token = retrieval.itm_token_id(processor, proto)
    if token is not None:
        itm_ids[:, 0] = token  # BLIP's image-grounded encoder starts with [ENC] (protocols.md §1.2)
    return {"pixel_values": _pixels(processor, examples), "input_ids": ids, "attention_mask": mask,
            "itm_input_ids": itm_ids, "image_index": torch.tensor([e["image_index"] for e in examples])}


def train_loss(model, batch: dict, cfg) -> torch.Tensor:
    """loss_itc + loss_itm. HF has no forward computing both, so `losses` runs as the model's forward for this one
    call: DDP then sees every parameter the loss uses (it only tracks what happens inside forward)."""
    inner = getattr(model, "module", model)
    family = "blip2-itm" if type(inner).__name__.startswith("Blip2") else "blip-itm"
    with _forward_as(inner, lambda **b: losses(inner, b, family)):
        return model(**batch)


@contextlib.contextmanager
def _forward_as(module: torch.nn.Module, fn):
    module.forward = fn
    try:
        yield
    finally:
        del module.forward


def losses(model, batch: dict, family: str, temp: float = TEMP) -> torch.Tensor:
    tokens, img_feat = retrieval.encode_images(model, batch["pixel_values"], family)
    txt_feat = retrieval.encode_texts(model, batch["input_ids"], batch["attention_mask"], family)
    idx = batch["image_index"].view(-1, 1)
    idx_all = dist.concat_all_gather(idx)
    positive = idx == idx_all.T  # every caption of the same image is a positive (sim_targets in BLIP)
    # BLIP-2 image features are one per query: the similarity is their max (§2.6); BLIP's is a plain cosine
    sim_i2t = retrieval._sims(img_feat, dist.all_gather_with_grad(txt_feat)) / temp
    sim_t2i = retrieval._sims(txt_feat, dist.all_gather_with_grad(img_feat)) / temp
    targets = positive.float() / positive.sum(1, keepdim=True)
    if family == "blip2-itm":  # LAVIS blip2_qformer: 0.9 * positives + 0.1 uniform
        targets = 0.9 * targets + 0.1 / targets.shape[1]
    loss_itc = -((F.log_softmax(sim_i2t, 1) * targets).sum(1).mean()
                 + (F.log_softmax(sim_t2i, 1) * targets).sum(1).mean()) / 2
    return loss_itc + _itm_loss(model, batch, family, tokens, sim_i2t.detach(), sim_t2i.detach(), positive)


def _hard_negatives(sim: torch.Tensor, positive: torch.Tensor, family: str) -> torch.Tensor:
    """One index per row drawn with probability softmax(sim), same-image entries excluded (BLIP, LAVIS)."""
    w = F.softmax(sim.float(), dim=1)
    if family == "blip2-itm":
        w = w + 1e-4  # LAVIS blip2_qformer adds 1e-4 before masking
    w = w.masked_fill(positive, 0)
    w[w.sum(1) == 0] = 1.0  # every sample of the gathered batch shows the same image: no negative exists
    return torch.multinomial(w, 1).squeeze(1)


def _itm_loss(model, batch, family, tokens, sim_i2t, sim_t2i, positive) -> torch.Tensor:
    neg_image = _hard_negatives(sim_t2i, positive, family)  # per text, an image of another sample (any rank)
    neg_text = _hard_negatives(sim_i2t, positive, family)  # per image, a text of another sample
    tokens_all = dist.all_gather_with_grad(tokens)  # negatives' gradients flow back to the rank that owns them
    ids, mask = batch["itm_input_ids"], batch["attention_mask"]
    if dist.world_size() > 1:  # batches are padded to their longest text: all_gather needs one width on every rank
        width = retrieval.PROTOCOLS[family].max_length
        ids, mask = F.pad(ids, (0, width - ids.shape[1])), F.pad(mask, (0, width - mask.shape[1]))
    ids_all, mask_all = dist.concat_all_gather(ids), dist.concat_all_gather(mask)
    logits = retrieval.itm_logits(model, torch.cat([tokens, tokens_all[neg_image], tokens]),
                                  torch.cat([ids, ids, ids_all[neg_text]]),
                                  torch.cat([mask, mask, mask_all[neg_text]]), family)
    n = ids.shape[0]
    labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(logits.device)
    return F.cross_entropy(logits, labels)


def tiny_blip2_itm(tok):
    """Blip2ForImageTextRetrieval at tiny-blip's size: 64 px ViT (patch 8, 64 wide, 2 layers), a 2-layer 64-wide
    Q-Former with cross-attention in every layer and 8 queries (334k parameters; the unused LLM config is tiny)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    cfg = Blip2Config(
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8),
        qformer_config=dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=256, max_position_embeddings=40, cross_attention_frequency=1,
                            pad_token_id=tok.pad_token_id, use_qformer_text_input=True),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16, max_position_embeddings=40),
        num_query_tokens=8, image_text_hidden_size=64)
    return Blip2ForImageTextRetrieval(cfg)
