"""recall_at_k against a naive full-matrix reference written the way BLIP's itm_eval is (protocols.md §1.2),
with the tie order of a stable descending sort, on random cases with and without ties."""
import numpy as np
import pytest
import torch

from blip_repro import metrics_retrieval
from blip_repro.errors import UserError
from blip_repro.metrics import recall_at_k


def reference_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """BLIP's itm_eval loop, with argsort made stable so that ties have one defined order."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score, kind="stable")[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1, tr5, tr10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score, kind="stable")[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1, ir5, ir10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    return {"tr_r1": tr1, "tr_r5": tr5, "tr_r10": tr10, "tr_mean": tr_mean, "ir_r1": ir1, "ir_r5": ir5,
            "ir_r10": ir10, "ir_mean": ir_mean, "r_mean": (tr_mean + ir_mean) / 2}


def random_case(rng, n_img, max_caps, integer_scores):
    caps = rng.integers(1, max_caps + 1, n_img)
    owner = rng.permutation(np.repeat(np.arange(n_img), caps))  # captions of an image are not contiguous
    txt2img = {t: int(i) for t, i in enumerate(owner)}
    img2txt = {i: [t for t in range(len(owner)) if owner[t] == i] for i in range(n_img)}
    shape = (n_img, len(owner))
    if integer_scores:  # few distinct values: many ties, also between a GT caption and others
        s_i2t, s_t2i = rng.integers(0, 4, shape).astype(np.float32), rng.integers(0, 4, shape[::-1]).astype(float)
    else:
        s_i2t, s_t2i = rng.normal(size=shape), rng.normal(size=shape[::-1]).astype(np.float32)
    return s_i2t, s_t2i, txt2img, img2txt


@pytest.mark.parametrize("integer_scores", [True, False])
def test_equals_reference_on_random_cases(integer_scores, monkeypatch):
    rng = np.random.default_rng(0)
    monkeypatch.setattr(metrics_retrieval, "_BLOCK_ELEMENTS", 50)  # several blocks per matrix
    for _ in range(60):
        case = random_case(rng, int(rng.integers(1, 25)), 5, integer_scores)
        out = recall_at_k(*case)
        expected = reference_itm_eval(*case)
        assert {k: out[k] for k in expected} == expected
        assert (out["n_images"], out["n_texts"]) == case[0].shape


def test_ties_put_the_last_index_first():
    # Image 0 owns text 0, which ties with text 1: reversed stable order is [1, 0, 2], so text 0 has rank 1.
    s_i2t = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    s_t2i = np.array([[2.0, 2.0], [0.0, 1.0], [0.0, 1.0]])  # text 0 ties images 0 and 1: image 1 comes first
    out = recall_at_k(s_i2t, s_t2i, [0, 1, 1], [[0], [1, 2]])
    assert out["tr_r1"] == 50.0 and out["tr_r5"] == 100.0
    assert out["ir_r1"] == 100.0 * 2 / 3


def test_best_ranked_caption_counts():
    # Image 0 owns texts 0 and 2: text 2 is second (rank 1), text 0 fourth. Image 1 owns texts 1 and 3.
    s_i2t = np.array([[0.1, 0.9, 0.5, 0.2], [0.0, 1.0, 0.0, 0.0]])
    out = recall_at_k(s_i2t, s_i2t.T, [0, 1, 0, 1], [[0, 2], [1, 3]])
    assert (out["tr_r1"], out["tr_r5"]) == (50.0, 100.0)
    assert out["r_mean"] == (out["tr_mean"] + out["ir_mean"]) / 2


def test_torch_input_matches_numpy():
    case = random_case(np.random.default_rng(3), 10, 5, integer_scores=False)
    t_i2t, t_t2i = torch.from_numpy(case[0]).float(), torch.from_numpy(case[1])
    assert recall_at_k(t_i2t, t_t2i, case[2], case[3]) == recall_at_k(t_i2t.numpy(), case[1], case[2], case[3])
    assert recall_at_k(t_i2t.bfloat16(), t_t2i, case[2], case[3])["n_texts"] == case[0].shape[1]


GOOD = ([0, 0, 1], [[0, 1], [2]])


@pytest.mark.parametrize("s_i2t, s_t2i, txt2img, img2txt, message", [
    (np.zeros((2, 3)), np.zeros((2, 3)), *GOOD, r"expected \(3, 2\)"),
    (np.zeros((2, 3)), np.zeros((3, 2)), [0, 0], GOOD[1], "txt2img has 2 entries"),
    (np.zeros((2, 3)), np.zeros((3, 2)), [0, 0, 1], [[0, 1], [1, 2]], "text 1 is listed under image 1"),
    (np.zeros((2, 3)), np.zeros((3, 2)), [0, 0, 0], [[0, 1, 2], []], r"img2txt\[1\] must be a non-empty list"),
    (np.zeros((2, 3)), np.zeros((3, 2)), [0, 0, 2], GOOD[1], r"txt2img\[2\] is 2, out of range"),
    (np.zeros((2, 3)), np.zeros((3, 2)), GOOD[0], [[0, 1, 5], [2]], "is 5, out of range"),
    (np.zeros((2, 3)), np.zeros((3, 2)), [0, 0, 1], [[0], [2]], "text 1 is listed 0 times"),
    (np.zeros((2, 3)), np.zeros((3, 2)), [0, 0, 1], [[0, 1, 1], [2]], "text 1 is listed 2 times"),
    (np.zeros((2, 3)), np.zeros((3, 2)), {0: 0, 1: 0, 5: 1}, GOOD[1], "no entry for 2"),
    (np.full((2, 3), np.nan), np.zeros((3, 2)), *GOOD, "scores_i2t contains NaN"),
    (np.zeros(3), np.zeros((3, 2)), *GOOD, "non-empty 2-D"),
])
def test_rejects_bad_input(s_i2t, s_t2i, txt2img, img2txt, message):
    with pytest.raises(UserError, match=message):
        recall_at_k(s_i2t, s_t2i, txt2img, img2txt)
