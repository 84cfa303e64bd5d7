"""Retrieval cost on this machine: (a) model throughput, (b) the ITC + top-k stage at COCO size and beyond.

    python benchmarks/retrieval.py                 # both parts
    python benchmarks/retrieval.py --only model    # (a) ITC images/s, ITC texts/s, ITM pairs/s
    python benchmarks/retrieval.py --only topk     # (b) wall time and peak memory of tasks.retrieval.itc_topk
    python benchmarks/retrieval.py --only topk --full   # (b) without sampling the 100k x 500k queries

(a) A BLIP-base-size BlipForImageTextRetrieval (ViT-B/16 at 384 px = 577 tokens, 12-layer BERT; random weights)
through the same functions the evaluation calls (encode_images, encode_texts, itm_logits), a few batches each.
(b) Random unit embeddings (256-d), k_test 256 for i2t and 128 for t2i. Every case runs in a fresh process; peak
memory = the process's high-water mark (VmHWM) minus its resident size once the embeddings exist, i.e. what the
stage itself needed. The 100k x 500k case times a slice of the queries against the whole gallery and extrapolates
(the full run is 2.6e13 multiply-adds per direction), unless --full.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = [  # (name, images, texts, image queries timed, text queries timed, memory budget MB)
    ("COCO 5k x 25k", 5_000, 25_000, 5_000, 25_000, 512),
    ("COCO 5k x 25k, 64 MB budget", 5_000, 25_000, 5_000, 25_000, 64),
    ("100k x 500k", 100_000, 500_000, 1_000, 2_000, 512),
]


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def topk_case(n_img: int, n_txt: int, q_img: int, q_txt: int, budget: float) -> dict:
    import torch

    from blip_repro.tasks.retrieval import itc_topk

    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n_img, 256, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n_txt, 256, generator=gen), dim=-1)
    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    itc_topk(img[:q_img], txt, 256, budget)
    t1 = time.perf_counter()
    itc_topk(txt[:q_txt], img, 128, budget)
    t2 = time.perf_counter()
    scale_i2t, scale_t2i = n_img / q_img, n_txt / q_txt
    return {"i2t_s": round(t1 - t0, 2), "t2i_s": round(t2 - t1, 2),
            "full_run_s": round((t1 - t0) * scale_i2t + (t2 - t1) * scale_t2i, 1),
            "extrapolated": scale_i2t > 1 or scale_t2i > 1,
            "peak_extra_mb": round(_rss_mb("VmHWM") - base, 1), "embeddings_mb": round((n_img + n_txt) * 1024 / 2**20, 1),
            "full_matrix_mb": round(n_img * n_txt * 4 / 2**20, 1), "budget_mb": budget,
            "topk_outputs_mb": round((q_img * 256 + q_txt * 128) * 12 / 2**20, 1)}


def model_case(batches: int = 3) -> dict:
    import torch
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from blip_repro.tasks.retrieval import encode_images, encode_texts, itm_logits

    torch.manual_seed(0)
    cfg = BlipConfig(vision_config={"image_size": 384}, text_config={"vocab_size": 30524})
    model = BlipForImageTextRetrieval(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    out = {"params_m": round(n_params / 1e6, 1), "threads": torch.get_num_threads()}
    with torch.no_grad():
        pixels = torch.randn(8, 3, 384, 384)
        ids = torch.randint(1000, 30000, (64, 35))
        mask = torch.ones_like(ids)
        encode_images(model, pixels[:2], "blip-itm")  # warm-up
        t = time.perf_counter()
        for _ in range(batches):
            tokens, _ = encode_images(model, pixels, "blip-itm")
        out["itc_images_per_s"] = round(batches * len(pixels) / (time.perf_counter() - t), 2)
        t = time.perf_counter()
        for _ in range(batches):
            encode_texts(model, ids, mask, "blip-itm")
        out["itc_texts_per_s"] = round(batches * len(ids) / (time.perf_counter() - t), 1)
        pairs = 32  # i2t style: one image's 577 tokens against 32 candidate texts
        img = tokens[:1].expand(pairs, -1, -1)
        t = time.perf_counter()
        for _ in range(batches):
            itm_logits(model, img, ids[:pairs], mask[:pairs], "blip-itm")
        out["itm_pairs_per_s"] = round(batches * pairs / (time.perf_counter() - t), 2)
    # What the paper protocol costs at that rate (protocols.md §1.2): every query re-ranks k_test candidates
    out["coco_itm_pairs"] = (5_000 + 25_010) * 256
    out["coco_itm_hours_at_this_rate"] = round(out["coco_itm_pairs"] / out["itm_pairs_per_s"] / 3600, 1)
    out["flickr_itm_hours_at_this_rate"] = round((1_000 + 5_000) * 128 / out["itm_pairs_per_s"] / 3600, 1)
    return out


def _in_subprocess(fn: str, *args) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import retrieval as b; " \
           f"print(json.dumps(b.{fn}(*{list(args)!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["model", "topk"])
    ap.add_argument("--full", action="store_true", help="time every query of the 100k x 500k case")
    args = ap.parse_args(argv)
    if args.only in (None, "model"):
        print("(a) BLIP-base-size retrieval model, random weights, 384 px, CPU fp32:")
        print(json.dumps(_in_subprocess("model_case"), indent=2))
    if args.only in (None, "topk"):
        print("(b) ITC + top-k (tasks.retrieval.itc_topk), random 256-d embeddings:")
        for name, n_img, n_txt, q_img, q_txt, budget in CASES:
            if args.full:
                q_img, q_txt = n_img, n_txt
            r = _in_subprocess("topk_case", n_img, n_txt, q_img, q_txt, budget)
            print(f"  {name}: {json.dumps(r)}")


if __name__ == "__main__":
    main()
