"""Speed and memory of blip_repro.metrics.recall_at_k against BLIP's itm_eval loop (argsort per row).

    python benchmarks/retrieval_metric.py              # COCO 5k test: 5,000 images x 25,000 captions
    python benchmarks/retrieval_metric.py --flickr     # Flickr30k 1k test: 1,000 x 5,000

Scores are built like BLIP's: cosine + ITM logit on each row's top-k (k_test 256 COCO, 128 Flickr; protocols.md
§1.2), -100 elsewhere, so the ties among the fillers are there too. Peak memory is measured with tracemalloc
(numpy reports its allocations to it) on top of the two score matrices.
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip_repro.metrics import recall_at_k  # noqa: E402


def blip_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt) -> dict:
    """BLIP's itm_eval, with argsort made stable so that the tie order is defined (see metrics_retrieval)."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score, kind="stable")[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score, kind="stable")[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return {"tr_r1": tr[0], "tr_r5": tr[1], "tr_r10": tr[2], "ir_r1": ir[0], "ir_r5": ir[1], "ir_r10": ir[2]}


def blip_like_scores(n_img: int, caps: int, k_test: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_txt = n_img * caps
    txt2img = {t: t // caps for t in range(n_txt)}
    img2txt = {i: list(range(i * caps, (i + 1) * caps)) for i in range(n_img)}
    emb_i = rng.normal(size=(n_img, 64)).astype(np.float32)
    emb_t = (np.repeat(emb_i, caps, axis=0) + 1.5 * rng.normal(size=(n_txt, 64))).astype(np.float32)
    sims = emb_i @ emb_t.T / 64
    s_i2t = np.full((n_img, n_txt), -100.0, dtype=np.float32)
    s_t2i = np.full((n_txt, n_img), -100.0, dtype=np.float32)
    for i in range(n_img):  # top-k by "ITC", re-scored by a noisy "ITM"
        top = np.argpartition(-sims[i], k_test)[:k_test]
        s_i2t[i, top] = sims[i, top] + rng.normal(scale=0.3, size=k_test)
    for t in range(n_txt):
        top = np.argpartition(-sims[:, t], min(k_test, n_img - 1))[:k_test]
        s_t2i[t, top] = sims[top, t] + rng.normal(scale=0.3, size=len(top))
    return s_i2t, s_t2i, txt2img, img2txt


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flickr", action="store_true", help="Flickr30k 1k test size instead of COCO 5k")
    args = parser.parse_args(argv)
    n_img, k_test = (1000, 128) if args.flickr else (5000, 256)
    case = blip_like_scores(n_img, 5, k_test)
    print(f"{n_img} images x {n_img * 5} texts, float32 matrices {2 * case[0].nbytes / 2**20:.0f} MB")
    tracemalloc.start()
    t0 = time.perf_counter()
    ours = recall_at_k(*case)
    t_ours = time.perf_counter() - t0
    peak_ours = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t0 = time.perf_counter()
    blip = blip_itm_eval(*case)
    t_blip = time.perf_counter() - t0
    assert {k: ours[k] for k in blip} == blip, (ours, blip)
    print(f"recall_at_k {t_ours:.2f} s (peak extra memory {peak_ours / 2**20:.0f} MB), BLIP argsort loop "
          f"{t_blip:.2f} s, speed-up {t_blip / t_ours:.1f}x, identical: TR@1 {ours['tr_r1']:.2f} "
          f"IR@1 {ours['ir_r1']:.2f} r_mean {ours['r_mean']:.2f}")


if __name__ == "__main__":
    main()
