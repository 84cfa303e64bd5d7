"""Captioning throughput on this machine: a BLIP-base-size model (random weights) at 384 px, BLIP's protocol
(3 beams, max 20 / min 5 tokens with the prompt), batched through blip_repro versus the one-image-at-a-time loop of
the Hugging Face model card. Prints images/s and peak memory; each mode runs in its own process so peaks are its own.

    python benchmarks/captioning.py [--images 8] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def build():
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    from blip_repro.data.shapes import vocabulary
    from blip_repro.tiny import BERT_SPECIALS, _image_processor

    words = BERT_SPECIALS + vocabulary()
    words += [f"[unused{i}]" for i in range(30524 - len(words))]  # BLIP's vocabulary size (protocols.md §1.1)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]", extra_special_tokens=["[ENC]"])
    torch.manual_seed(0)
    cfg = BlipConfig(vision_config=dict(image_size=384, patch_size=16, initializer_range=0.02),
                     text_config=dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, pad_token_id=0,
                                      sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id))
    model = BlipForConditionalGeneration(cfg).eval()
    return model, BlipProcessor(image_processor=_image_processor(384), tokenizer=tok)


def run(mode: str, n: int, batch: int) -> dict:
    import torch
    from PIL import Image

    from blip_repro.tasks import captioning

    model, proc = build()
    images = [Image.new("RGB", (640, 480), (i * 20 % 255, 90, 160)) for i in range(n)]
    protocol = captioning.PROTOCOLS["blip"]
    t = time.perf_counter()
    with torch.no_grad():
        if mode == "batched":
            for i in range(0, n, batch):
                captioning.predict(model, proc, images[i:i + batch], protocol, "blip")
        else:  # the model card: processor + generate, one image at a time
            for im in images:
                inputs = proc(images=im, text=protocol.prompt, return_tensors="pt")
                model.generate(**inputs, num_beams=3, max_length=20, min_length=5)
    dt = time.perf_counter() - t
    return {"mode": mode, "images": n, "seconds": round(dt, 2), "images_per_s": round(n / dt, 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mode", choices=["batched", "loop"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(run(a.mode, a.images, a.batch)))
        return
    for mode in ("loop", "batched"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--images", str(a.images),
                              "--batch", str(a.batch)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:8s} {r['images']} images in {r['seconds']:7.2f} s = {r['images_per_s']:.3f} images/s, "
              f"peak RSS {r['peak_rss_mib']} MiB ({r['params_m']} M params, {r['threads']} threads)")


if __name__ == "__main__":
    main()
