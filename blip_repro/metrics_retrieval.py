"""Image-text retrieval recall@K, identical to BLIP's `itm_eval` (protocols.md §1.2 item 5; LAVIS retrieval task).

BLIP ranks a row with `np.argsort(score)[::-1]` and takes the position of the ground truth. Here the position is
counted instead of sorted: rank = #entries greater than the GT score + #entries equal to it at a *later* index,
which is that position for a stable ascending sort reversed (among ties the last index comes first). numpy's
default argsort is not stable (on this machine even 8-element rows with ties come out in another order), so BLIP's
own tie order depends on the numpy build; ties only occur between the -100 fillers outside the top-k, far beyond
R@10. Rows are processed in blocks, so no extra full-size copy of the score matrices is made.
"""
from __future__ import annotations

import operator

import numpy as np

from blip_repro.errors import UserError

_BLOCK_ELEMENTS = 1 << 22  # ~4M scores per block: a few MB of temporaries whatever the matrix size


def _as_matrix(scores, name: str) -> np.ndarray:
    if hasattr(scores, "detach"):  # a torch tensor; numpy has no bfloat16
        scores = scores.detach().cpu()
        if str(scores.dtype) == "torch.bfloat16":
            scores = scores.float()
        scores = scores.numpy()
    scores = np.asarray(scores)
    if scores.ndim != 2 or 0 in scores.shape:
        raise UserError(f"{name} must be a non-empty 2-D score matrix, got shape {scores.shape}")
    return scores


def _index(value, bound: int, what: str) -> int:
    try:
        i = operator.index(value)
    except TypeError:
        raise UserError(f"{what} is {value!r}, not an integer index") from None
    if not 0 <= i < bound:
        raise UserError(f"{what} is {i}, out of range 0..{bound - 1}")
    return i


def _as_list(mapping, n: int, name: str) -> list:
    """A dict keyed 0..n-1 or a sequence of length n, as a list."""
    if isinstance(mapping, dict):
        missing = next((k for k in range(n) if k not in mapping), None)
        if missing is not None or len(mapping) != n:
            extra = next((k for k in mapping if not (isinstance(k, int) and 0 <= k < n)), None)
            detail = f"no entry for {missing}" if missing is not None else f"unexpected key {extra!r}"
            raise UserError(f"{name} must have the keys 0..{n - 1} (one per row of the score matrix): {detail}")
        return [mapping[k] for k in range(n)]
    mapping = list(mapping)
    if len(mapping) != n:
        raise UserError(f"{name} has {len(mapping)} entries but the score matrices have {n}")
    return mapping


def _check_mappings(txt2img, img2txt, n_img: int, n_txt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """txt2img as an array, and img2txt flattened to (image, text) pairs in image order; img2txt must be its inverse."""
    t2i = np.array([_index(i, n_img, f"txt2img[{t}]") for t, i in enumerate(_as_list(txt2img, n_txt, "txt2img"))])
    pair_img, pair_txt = [], []
    for i, texts in enumerate(_as_list(img2txt, n_img, "img2txt")):
        if isinstance(texts, (str, bytes)) or not hasattr(texts, "__len__") or len(texts) == 0:
            raise UserError(f"img2txt[{i}] must be a non-empty list of text indices (every image needs a caption), "
                            f"got {texts!r}")
        for t in texts:
            t = _index(t, n_txt, f"a text index in img2txt[{i}]")
            if t2i[t] != i:
                raise UserError(f"text {t} is listed under image {i} in img2txt but txt2img[{t}] = {t2i[t]}")
            pair_img.append(i)
            pair_txt.append(t)
    listed = np.bincount(np.array(pair_txt, dtype=np.int64), minlength=n_txt)
    if (listed != 1).any():
        t = int(np.flatnonzero(listed != 1)[0])
        raise UserError(f"text {t} is listed {listed[t]} times in img2txt; each text belongs to exactly one image")
    return t2i, np.array(pair_img, dtype=np.int64), np.array(pair_txt, dtype=np.int64)


def _gt_ranks(scores: np.ndarray, gt_cols: np.ndarray, name: str) -> np.ndarray:
    """For each row r, the position of column gt_cols[r] in np.argsort(scores[r], kind="stable")[::-1]."""
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    cols = np.arange(scores.shape[1])
    step = max(1, _BLOCK_ELEMENTS // scores.shape[1])
    for start in range(0, scores.shape[0], step):
        block = scores[start:start + step]  # a view, not a copy
        gt_col = gt_cols[start:start + step]
        gt = block[np.arange(len(block)), gt_col][:, None]
        if np.isnan(block).any():
            raise UserError(f"{name} contains NaN (rows {start}..{start + len(block) - 1}); ranks are undefined")
        later_ties = (block == gt) & (cols[None, :] > gt_col[:, None])
        ranks[start:start + step] = (block > gt).sum(axis=1) + later_ties.sum(axis=1)
    return ranks


def _best_caption(s_i2t: np.ndarray, pair_img: np.ndarray, pair_txt: np.ndarray) -> np.ndarray:
    """Per image, the GT caption that comes first in the descending order: highest score, on ties the last index.
    Its rank is the minimum over the image's captions that itm_eval takes."""
    order = np.lexsort((pair_txt, s_i2t[pair_img, pair_txt], pair_img))
    img, txt = pair_img[order], pair_txt[order]
    return txt[np.r_[img[1:] != img[:-1], True]]  # the last pair of each image's group


def _recalls(ranks: np.ndarray) -> tuple[float, float, float]:
    # Same float operations as itm_eval: 100.0 * count / n.
    return tuple(100.0 * int(np.count_nonzero(ranks < k)) / len(ranks) for k in (1, 5, 10))


def recall_at_k(scores_i2t, scores_t2i, txt2img, img2txt) -> dict:
    """Text retrieval (TR, image -> its best-ranked GT caption) and image retrieval (IR, text -> its image) R@1/5/10
    in percent, their means and r_mean = (tr_mean + ir_mean) / 2.

    scores_i2t: [N_img, N_txt], scores_t2i: [N_txt, N_img] (numpy or torch); txt2img: text index -> image index;
    img2txt: image index -> list of text indices (dicts keyed 0..N-1 or sequences)."""
    s_i2t = _as_matrix(scores_i2t, "scores_i2t")
    s_t2i = _as_matrix(scores_t2i, "scores_t2i")
    n_img, n_txt = s_i2t.shape
    if s_t2i.shape != (n_txt, n_img):
        raise UserError(f"scores_t2i has shape {s_t2i.shape} but scores_i2t is {s_i2t.shape}; "
                        f"expected ({n_txt}, {n_img})")
    t2i, pair_img, pair_txt = _check_mappings(txt2img, img2txt, n_img, n_txt)
    tr = _recalls(_gt_ranks(s_i2t, _best_caption(s_i2t, pair_img, pair_txt), "scores_i2t"))
    ir = _recalls(_gt_ranks(s_t2i, t2i, "scores_t2i"))
    tr_mean = (tr[0] + tr[1] + tr[2]) / 3
    ir_mean = (ir[0] + ir[1] + ir[2]) / 3
    return {
        "tr_r1": tr[0], "tr_r5": tr[1], "tr_r10": tr[2], "tr_mean": tr_mean,
        "ir_r1": ir[0], "ir_r5": ir[1], "ir_r10": ir[2], "ir_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
        "n_images": n_img, "n_texts": n_txt,
    }
