"""Image-text retrieval (BLIP Tables 5-6, BLIP-2 Table 5): ITC top-k, then ITM re-ranking (protocols.md §1.2, §2.6).

`evaluate_run` runs four stages. Each is cut into fixed chunks (the same whatever the number of processes), spread
over ranks with `dist.shard`, and saved under `<run dir>/stages/` as it finishes, so a killed run resumes where it
stopped and 1 or N processes compute the same bits:
1. images: every ViT token (kept for ITM) and the normalized ITC embedding (BLIP: vision_proj(CLS); BLIP-2: the
   query embeddings), computed once;
2. texts: the normalized ITC embedding of [CLS];
3. per chunk of queries (i2t: images, t2i: texts): raw cosine top-k over the whole gallery, block by block under
   `itc_memory_mb` (`itc_topk`), so memory never grows with N x M;
4. the ITM head on the k candidates of every query of the chunk, batched across queries; BLIP puts `[ENC]` first.
Rank 0 gathers the chunks exactly once each (`dist.gather_sharded`), builds BLIP's score matrices (ITM positive
logit + cosine on the top-k, -100 elsewhere), scores them with `metrics.recall_at_k`, writes topk.pt,
predictions.jsonl and provenance.json. Training lives in `retrieval_losses`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from blip_repro import dist
from blip_repro.data import readers
from blip_repro.errors import UserError


@dataclass(frozen=True)
class RetrievalProtocol:
    k_test: int  # ITC candidates re-ranked by ITM per query
    max_words: int  # pre_caption truncation
    max_length: int = 35  # tokens, padded to this length as the original code does
    itm_first_token: str | None = "[ENC]"  # BLIP's image-grounded encoder starts with [ENC]; BLIP-2 keeps [CLS]
    source: str = ""


PROTOCOLS = {
    "blip-itm": RetrievalProtocol(256, 30, 35, "[ENC]", "BLIP configs/retrieval_{coco,flickr}.yaml, "
                                  "train_retrieval.py::evaluation (protocols.md §1.2)"),
    "blip2-itm": RetrievalProtocol(128, 50, 35, None, "LAVIS ret_{coco,flickr}_eval.yaml, "
                                   "blip2.py::compute_sim_matrix (protocols.md §2.6)"),
}
# k_test per (family, dataset): BLIP 256 on COCO, 128 on Flickr30k; BLIP-2 128 on both (protocols.md §1.2, §2.6).
# shapes (200 images, 1,000 captions): 32, so the CPU re-ranks 38k pairs, not 154k; R@10 needs only the top 10.
K_TEST = {("blip-itm", "coco"): 256, ("blip-itm", "flickr30k"): 128, ("blip-itm", "shapes"): 32,
          ("blip2-itm", "shapes"): 32}
ANN_FILES = {"coco": "coco_karpathy_{split}.json", "flickr30k": "flickr30k_{split}.json",
             "shapes": "coco_karpathy_{split}.json"}
DEVIATIONS = {
    "blip-itm": "fine-tuning here (tiny models) has no momentum encoder, queue or distillation; evaluation follows "
                "train_retrieval.py, with [ENC] inserted (HF does not, protocols.md §4.3).",
}
IMAGE_CHUNK, TEXT_CHUNK, QUERY_CHUNK = 64, 1024, 32  # per stage file; fixed, so any world size cuts the same


def protocol_for(family: str, dataset: str, k_test: int | None = None) -> RetrievalProtocol:
    if family not in PROTOCOLS:
        raise UserError(f"model family {family!r} cannot do retrieval; use an ITM model (blip-base-itm-coco, "
                        "itm-vit-g-coco, tiny-blip-itm, ... : blip-repro zoo)")
    p = PROTOCOLS[family]
    p = replace(p, k_test=K_TEST.get((family, dataset), p.k_test))
    return replace(p, k_test=k_test) if k_test is not None else p


def read(cfg) -> dict:
    images, anns = readers.dataset_paths(cfg.dataset)
    return readers.read_retrieval(required_files(cfg)[0], images, cfg.limit)


def required_files(cfg) -> list:
    if cfg.dataset not in ANN_FILES:
        raise UserError(f"dataset {cfg.dataset!r} has no retrieval split; valid: {', '.join(ANN_FILES)}")
    return [readers.dataset_paths(cfg.dataset)[1] / ANN_FILES[cfg.dataset].format(split=cfg.split)]


# --- the model pieces (HF has no ranking API: these call its submodules as its own forward does) ------------------
def encode_images(model, pixel_values, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(all ViT tokens [B, L, H], normalized ITC embedding: BLIP [B, D], BLIP-2 one per query [B, Q, D])."""
    tokens = model.vision_model(pixel_values=pixel_values).last_hidden_state
    if family == "blip-itm":
        return tokens, F.normalize(model.vision_proj(tokens[:, 0]), dim=-1)
    queries = model.query_tokens.expand(tokens.shape[0], -1, -1)
    out = model.qformer(query_embeds=queries, encoder_hidden_states=tokens,
                        encoder_attention_mask=_ones(tokens)).last_hidden_state
    return tokens, F.normalize(model.vision_projection(out.to(model.vision_projection.weight.dtype)), dim=-1)


def encode_texts(model, input_ids, attention_mask, family: str) -> torch.Tensor:
    """Normalized ITC embedding of the unimodal text encoder's [CLS] [B, D]."""
    if family == "blip-itm":
        h = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(model.text_proj(h[:, 0]), dim=-1)
    h = model.qformer(query_embeds=model.embeddings(input_ids=input_ids), query_length=0,
                      attention_mask=attention_mask).last_hidden_state
    return F.normalize(model.text_projection(h[:, 0].to(model.text_projection.weight.dtype)), dim=-1)


def itm_logits(model, image_tokens, input_ids, attention_mask, family: str) -> torch.Tensor:
    """2-way ITM logits [B, 2] of (image, text) pairs. BLIP: the caller has put [ENC] first; BLIP-2: mean over
    the query outputs (LAVIS compute_itm)."""
    if family == "blip-itm":
        h = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                               encoder_attention_mask=_ones(image_tokens)).last_hidden_state
        return model.itm_head(h[:, 0])
    n_query = model.query_tokens.shape[1]
    queries = model.query_tokens.expand(input_ids.shape[0], -1, -1)
    mask = torch.cat([torch.ones(queries.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device),
                      attention_mask], dim=1)
    h = model.qformer(query_embeds=model.embeddings(input_ids=input_ids, query_embeds=queries),
                      query_length=n_query, attention_mask=mask, encoder_hidden_states=image_tokens,
                      encoder_attention_mask=_ones(image_tokens)).last_hidden_state
    return model.itm_head(h[:, :n_query].to(model.itm_head.weight.dtype)).mean(dim=1)


def _ones(tokens):
    return torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)


def itm_token_id(processor, proto: RetrievalProtocol, vocab_size: int | None = None) -> int | None:
    """Id of the token that replaces [CLS] for ITM ([ENC] for BLIP, none for BLIP-2), from the tokenizer."""
    if proto.itm_first_token is None:
        return None
    tok = getattr(processor, "tokenizer", processor)
    i = tok.convert_tokens_to_ids(proto.itm_first_token)
    if i is not None and i != tok.unk_token_id:
        return i
    # A tokenizer that knows BLIP's [DEC] (30522) but not [ENC]: BLIP's init_tokenizer added [ENC] = 30523 right
    # after it, and the 30524-row embedding holds it (protocols.md §1.1, §4.3)
    if proto.itm_first_token == "[ENC]" and (tok.convert_tokens_to_ids("[DEC]") == 30522 or vocab_size == 30524):
        return 30523
    raise UserError(f"the tokenizer has no {proto.itm_first_token} token, which BLIP's ITM needs first "
                    "(protocols.md §4.3); use a BLIP retrieval checkpoint with its own processor")


def tokenize(processor, texts: list[str], proto: RetrievalProtocol, padding: str = "max_length"):
    """(input_ids, attention_mask) of pre_caption(text, max_words), at most max_length tokens, padded to max_length
    as train_retrieval.py and LAVIS compute_sim_matrix do (training pads to the longest: the same, cheaper)."""
    from blip_repro.tasks.captioning import readers_pre_caption

    tok = getattr(processor, "tokenizer", processor)
    enc = tok([readers_pre_caption(t, proto.max_words) for t in texts], padding=padding, truncation=True,
              max_length=proto.max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# --- stage 3: ITC top-k under a memory budget ----------------------------------------------------------------------
def _sims(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Cosine of every query with every gallery item; a side with several embeddings (BLIP-2 images) takes the max."""
    if q.dim() == 3:
        return (q.reshape(-1, q.shape[-1]) @ g.T).view(q.shape[0], q.shape[1], g.shape[0]).amax(dim=1)
    if g.dim() == 3:
        return (q @ g.reshape(-1, g.shape[-1]).T).view(q.shape[0], g.shape[0], g.shape[1]).amax(dim=2)
    return q @ g.T


@torch.no_grad()
def itc_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, memory_mb: float = 512):
    """(values, indices) [Nq, k] of the k most similar gallery items per query, best first, computed over blocks
    of queries x gallery items holding about `memory_mb` of similarities: memory is O(budget + Nq * k), never
    O(Nq * M). Raw cosine, no temperature (protocols.md §1.2 item 3)."""
    n_q, n_g = queries.shape[0], gallery.shape[0]
    if not 0 < k <= n_g:
        raise UserError(f"k_test {k} must be between 1 and the gallery size {n_g}")
    per_pair = 8 * (queries.shape[1] if queries.dim() == 3 else 1) * (gallery.shape[1] if gallery.dim() == 3 else 1)
    pairs = max(1, int(memory_mb * 2**20) // (per_pair + 8))
    bq = min(n_q, max(1, math.isqrt(pairs)))
    bg = min(n_g, max(k, pairs // bq))
    values, indices = torch.empty(n_q, k), torch.empty(n_q, k, dtype=torch.long)
    for q0 in range(0, n_q, bq):
        qb, best_v, best_i = queries[q0:q0 + bq].float(), None, None
        for g0 in range(0, n_g, bg):
            v, i = _sims(qb, gallery[g0:g0 + bg].float()).topk(min(k, min(bg, n_g - g0)), dim=1)
            i += g0
            if best_v is not None:  # merge with the best so far: 2k candidates, keep k
                v, pos = torch.cat([best_v, v], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, pos)
            best_v, best_i = v, i
        values[q0:q0 + bq], indices[q0:q0 + bq] = best_v, best_i
    return values, indices


# --- stage files -------------------------------------------------------------------------------------------------
def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _file(folder: Path, kind: str, start: int, stop: int, suffix: str = "") -> Path:
    return folder / f"{kind}-{start:07d}-{stop:07d}{suffix}.pt"


def _save(path: Path, obj) -> None:
    import io

    from blip_repro.fileio import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())  # a killed run leaves no half-written stage file


def _load(path: Path, mmap: bool = False):
    return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


def _fill(folder: Path, kind: str, chunks: list, compute, show: bool) -> None:
    """Compute this rank's chunks (dist.shard over chunk numbers) that are not on disk yet."""
    from tqdm.auto import tqdm

    mine = [chunks[j] for j in dist.shard(len(chunks)) if not _file(folder, kind, *chunks[j]).exists()]
    for start, stop in tqdm(mine, desc=f"retrieval {kind}", disable=not show or not mine, mininterval=2):
        _save(_file(folder, kind, start, stop), compute(start, stop))


class _Rows:
    """Rows of tensors stored as chunk files, memory-mapped: ViT tokens are read only for the ITM candidates."""

    def __init__(self, folder: Path, kind: str, chunks: list):
        self.size, self.parts = chunks[0][1] - chunks[0][0], [_load(_file(folder, kind, *c), mmap=True) for c in chunks]

    def cat(self, key: str) -> torch.Tensor:
        return torch.cat([p[key] for p in self.parts])

    def take(self, key: str, rows: list[int]) -> torch.Tensor:
        return torch.stack([self.parts[r // self.size][key][r % self.size] for r in rows])


# --- stages 1-4 ----------------------------------------------------------------------------------------------------
def _where(module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _image_chunk(model, processor, paths: list, family: str, batch_size: int) -> dict:
    device, dtype = _where(model.vision_model)
    tokens, embeds = [], []
    for i in range(0, len(paths), batch_size):
        images = [readers.load_image(p) for p in paths[i:i + batch_size]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device, dtype)
        t, e = encode_images(model, pixels, family)
        tokens.append(t.cpu())
        embeds.append(e.float().cpu())
    return {"tokens": torch.cat(tokens), "embeds": torch.cat(embeds)}


def _text_chunk(model, ids, mask, family: str, batch_size: int) -> dict:
    device = _where(model)[0]
    return {"embeds": torch.cat([encode_texts(model, ids[i:i + batch_size].to(device),
                                              mask[i:i + batch_size].to(device), family).float().cpu()
                                 for i in range(0, len(ids), batch_size)])}


@dataclass
class _Stage:
    """What re-ranking a chunk of queries needs."""
    model: torch.nn.Module
    family: str
    itm_token: int | None
    k_test: int
    cfg: object
    folder: Path
    images: _Rows
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor


def _rerank(s: _Stage, direction: str, start: int, stop: int) -> dict:
    """Stages 3 and 4 for queries start..stop-1 of one direction; each stage's result is saved before the next."""
    final, itc_file = _file(s.folder, direction, start, stop), _file(s.folder, direction, start, stop, ".itc")
    if final.exists():
        return _load(final)
    if itc_file.exists():
        itc = _load(itc_file)
    else:
        q, g = (s.image_embeds, s.text_embeds) if direction == "i2t" else (s.text_embeds, s.image_embeds)
        values, indices = itc_topk(q[start:stop], g, s.k_test, s.cfg.itc_memory_mb)
        itc = {"indices": indices, "itc": values}
        _save(itc_file, itc)
    queries = torch.arange(start, stop).repeat_interleave(s.k_test)
    cands = itc["indices"].reshape(-1)
    pair_img, pair_txt = (queries, cands) if direction == "i2t" else (cands, queries)
    device, bs, itm = _where(s.model)[0], s.cfg.itm_batch_size, torch.empty(len(cands))
    for b in range(0, len(cands), bs):
        ids = s.ids[pair_txt[b:b + bs]].clone()
        if s.itm_token is not None:
            ids[:, 0] = s.itm_token  # the image-grounded encoder's first token (protocols.md §1.2 item 1, §4.3)
        tokens = s.images.take("tokens", pair_img[b:b + bs].tolist()).to(device)
        logits = itm_logits(s.model, tokens, ids.to(device), s.mask[pair_txt[b:b + bs]].to(device), s.family)
        itm[b:b + bs] = logits[:, 1].float().cpu()  # raw positive-class logit, not a softmax (§1.2 item 4)
    out = {**itc, "itm": itm.view_as(itc["itc"])}
    _save(final, out)
    itc_file.unlink(missing_ok=True)
    return out


@torch.no_grad()
def compute_topk(model, processor, data: dict, proto: RetrievalProtocol, cfg, family: str, folder: Path) -> dict:
    """Stages 1-4 on every rank; returns {"i2t"|"t2i": {"indices", "itc", "itm"} [N, k]} (all queries, on every rank)."""
    from tqdm.auto import tqdm

    show = dist.is_main()
    folder.mkdir(parents=True, exist_ok=True)
    ids, mask = tokenize(processor, data["texts"], proto)
    n_img, n_txt = len(data["images"]), len(data["texts"])
    ichunks, tchunks = _chunks(n_img, IMAGE_CHUNK), _chunks(n_txt, TEXT_CHUNK)
    _fill(folder, "image", ichunks, lambda a, b: _image_chunk(model, processor, data["images"][a:b], family,
                                                               cfg.batch_size), show)
    _fill(folder, "text", tchunks, lambda a, b: _text_chunk(model, ids[a:b], mask[a:b], family,
                                                             cfg.itm_batch_size), show)
    dist.barrier()  # every rank's features are on disk
    images = _Rows(folder, "image", ichunks)
    stage = _Stage(model, family, itm_token_id(processor, proto, model.config.text_config.vocab_size), proto.k_test, cfg, folder, images,
                   images.cat("embeds"), _Rows(folder, "text", tchunks).cat("embeds"), ids, mask)
    jobs = [("i2t", a, b) for a, b in _chunks(n_img, QUERY_CHUNK)] + [("t2i", a, b) for a, b in
                                                                      _chunks(n_txt, QUERY_CHUNK)]
    mine = [_rerank(stage, *jobs[j]) for j in tqdm(dist.shard(len(jobs)), desc="retrieval ITC top-k + ITM",
                                                   disable=not show, mininterval=2)]
    parts = dist.gather_sharded(mine, len(jobs))  # every chunk exactly once, in order
    return {d: {key: torch.cat([p[key] for (dd, _, _), p in zip(jobs, parts) if dd == d])
                for key in ("indices", "itc", "itm")} for d in ("i2t", "t2i")}


# --- scoring -------------------------------------------------------------------------------------------------------
def score_matrices(topk: dict, n_img: int, n_txt: int, itm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's score_matrix_i2t [N_img, N_txt] and score_matrix_t2i [N_txt, N_img]: ITM positive logit + cosine on each
    query's top-k, -100 elsewhere (protocols.md §1.2 item 4). itm=False: cosine only (the control)."""
    out = []
    for d, shape in (("i2t", (n_img, n_txt)), ("t2i", (n_txt, n_img))):
        t = topk[d]
        m = torch.full(shape, -100.0)
        m.scatter_(1, t["indices"], t["itc"] + t["itm"] if itm else t["itc"])
        out.append(m)
    return out[0], out[1]


def chance(img2txt: list, n_txt: int) -> dict:
    """Expected recalls of a random ranking: IR@K = K/N; TR@K = P(one of the image's c captions in the top K)."""
    n_img = len(img2txt)
    tr = {k: 100 * sum(1 - math.prod((n_txt - len(c) - j) / (n_txt - j) for j in range(min(k, n_txt)))
                       for c in img2txt) / n_img for k in (1, 5, 10)}
    ir = {k: 100 * min(k, n_img) / n_img for k in (1, 5, 10)}
    return {"chance_tr_r1": tr[1], "chance_ir_r1": ir[1],
            "chance_r_mean": (sum(tr.values()) + sum(ir.values())) / 6}


def score(topk: dict, data: dict, proto: RetrievalProtocol) -> dict:
    from blip_repro.metrics import recall_at_k

    n_img, n_txt = len(data["images"]), len(data["texts"])
    out = recall_at_k(*score_matrices(topk, n_img, n_txt), data["txt2img"], data["img2txt"])
    cos = recall_at_k(*score_matrices(topk, n_img, n_txt, itm=False), data["txt2img"], data["img2txt"])
    out.update({f"itc_only_{k}": cos[k] for k in ("tr_r1", "ir_r1", "r_mean")})  # what the ITM re-rank adds
    out.update(chance(data["img2txt"], n_txt))
    owners: dict[str, set] = {}
    for t, text in enumerate(data["texts"]):
        owners.setdefault(text.strip().lower(), set()).add(data["txt2img"][t])
    # captions that also describe another image verbatim: no model can rank their own image first for sure
    out["n_texts_shared_across_images"] = sum(1 for t in data["texts"] if len(owners[t.strip().lower()]) > 1)
    out.update({"n_scored": n_img + n_txt, "k_test": proto.k_test, "protocol": dataclasses.asdict(proto)})
    return out


def write_predictions(path: Path, topk: dict, data: dict, top: int = 10) -> None:
    """One line per query: its `top` best gallery indices by final score, the scores and the ground truth."""
    from blip_repro.fileio import atomic_write_text

    lines = []
    for d in ("i2t", "t2i"):
        t = topk[d]
        final = t["itc"] + t["itm"]
        order = final.argsort(dim=1, descending=True, stable=True)[:, :top]
        ranked, scores = t["indices"].gather(1, order), final.gather(1, order)
        for q in range(len(ranked)):
            rec = {"direction": d, "query": q, "ranked": ranked[q].tolist(),
                   "scores": [round(v, 5) for v in scores[q].tolist()]}
            rec.update({"image": data["image_files"][q], "gt": data["img2txt"][q]} if d == "i2t" else
                       {"text": data["texts"][q], "gt": data["txt2img"][q]})
            lines.append(json.dumps(rec))
    atomic_write_text(path, "\n".join(lines) + "\n")


# --- the interface evaluate.py drives ------------------------------------------------------------------------------
def evaluate_run(cfg, run_dir: Path, state) -> dict | None:
    """Stages 1-4 (resumable, sharded), then on rank 0: metrics, topk.pt, predictions.jsonl, provenance.json."""
    import sys

    from blip_repro import zoo
    from blip_repro.evaluate import provenance
    from blip_repro.fileio import atomic_write_json

    t0 = time.time()
    data = read(cfg)
    model, processor = zoo.load_model(cfg.model, cfg.device, cfg.dtype)
    family = zoo.family_of(model)
    proto = protocol_for(family, cfg.dataset, cfg.k_test)
    n_img = len(data["images"])
    if not 0 < proto.k_test <= n_img:
        raise UserError(f"k_test {proto.k_test} must be between 1 and the gallery size: {cfg.dataset} {cfg.split} "
                        f"has {n_img} images{f' with limit {cfg.limit}' if cfg.limit else ''}; lower k_test")
    done = run_dir / "topk.pt"
    if not done.exists():
        topk = compute_topk(model, processor, data, proto, cfg, family, run_dir / "stages")
        if state.is_main:
            _save(done, topk)
            shutil.rmtree(run_dir / "stages", ignore_errors=True)  # ViT tokens: gigabytes for COCO
    dist.barrier()
    if not state.is_main:
        return None
    topk = _load(done)
    metrics = score(topk, data, proto)
    write_predictions(run_dir / "predictions.jsonl", topk, data)
    atomic_write_json(run_dir / "provenance.json", provenance(cfg, model, time.time() - t0, sys.modules[__name__]))
    return metrics


def load_scores(run_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The score matrices (i2t, t2i) of a finished run, rebuilt from its topk.pt."""
    topk = _load(Path(run_dir) / "topk.pt")
    n_img, n_txt = topk["i2t"]["indices"].shape[0], topk["t2i"]["indices"].shape[0]
    return score_matrices(topk, n_img, n_txt)


# --- training (blip_repro.train drives these; the losses are in retrieval_losses) ----------------------------------
def train_examples(cfg, processor) -> list[dict]:
    from blip_repro.tasks import retrieval_losses

    return retrieval_losses.train_examples(cfg, processor)


def train_batch_for(processor, examples: list[dict], cfg, family: str) -> dict:
    from blip_repro.tasks import retrieval_losses

    return retrieval_losses.train_batch_for(processor, examples, cfg, family)


def train_loss(model, batch: dict, cfg) -> torch.Tensor:
    from blip_repro.tasks import retrieval_losses

    return retrieval_losses.train_loss(model, batch, cfg)
