"""Retrieval (tasks/retrieval.py): readers, protocol, the bounded-memory ITC top-k, the ITC/ITM score construction
against a naive full computation with the HF forward, the [ENC] token, resuming after a crash in each stage, and
the training losses without a process group."""
from __future__ import annotations

import json

import pytest
import torch

from blip_repro import tiny
from blip_repro.data import readers, shapes
from blip_repro.errors import UserError
from blip_repro.evaluate import evaluate
from blip_repro.runs import EvalConfig
from blip_repro.tasks import retrieval, retrieval_losses

LIMIT, K = 70, 5  # 70 images (2 image chunks), 350 captions; k_test 5 keeps the ITM stage fast


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    """Randomly initialised tiny retrieval models saved as HF folders (no training needed to test the plumbing)."""
    root = tmp_path_factory.mktemp("models")
    return {name: str(tiny.build(name, save_to=root / name)) for name in ("tiny-blip-itm", "tiny-blip2-itm")}


def _cfg(model: str, **kw) -> EvalConfig:
    return EvalConfig(task="retrieval", model=model, dataset="shapes", limit=kw.pop("limit", LIMIT),
                      k_test=kw.pop("k_test", K), batch_size=16, **kw)


# ---- readers -----------------------------------------------------------------------------------------------------

def _write(tmp_path, records) -> str:
    f = tmp_path / "flickr30k_test.json"
    f.write_text(json.dumps(records))
    return str(f)


def test_reader_builds_both_maps_with_unequal_caption_lists(tmp_path):
    f = _write(tmp_path, [{"image": "flickr30k-images/1.jpg", "caption": ["a", "b", "c"]},
                          {"image": "flickr30k-images/2.jpg", "caption": ["d", "e"]},
                          {"image": "flickr30k-images/3.jpg", "caption": "f"}])
    d = readers.read_retrieval(f, tmp_path)
    assert d["texts"] == ["a", "b", "c", "d", "e", "f"]
    assert d["txt2img"] == [0, 0, 0, 1, 1, 2]
    assert d["img2txt"] == [[0, 1, 2], [3, 4], [5]]
    assert d["images"][1] == tmp_path / "flickr30k-images/2.jpg"
    assert readers.read_retrieval(f, tmp_path, limit=2)["txt2img"] == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("records, message", [
    ([{"image": "a.jpg", "caption": ["x"]}, {"image": "a.jpg", "caption": ["y"]}], "listed twice"),
    ([{"image": "a.jpg", "caption": []}], "empty caption list"),
    ([{"image": "a.jpg", "caption": ["x", 3]}], "non-text caption"),
    ([{"caption": ["x"]}], "record 0 needs"),
    ({"image": "a.jpg"}, "non-empty JSON list"),
])
def test_reader_rejects_bad_files_in_one_line(tmp_path, records, message):
    with pytest.raises(UserError, match=message) as e:
        readers.read_retrieval(_write(tmp_path, records), tmp_path)
    assert "\n" not in str(e.value)


def test_shapes_split_is_the_karpathy_test_file():
    data = retrieval.read(_cfg("x", limit=None))
    assert len(data["images"]) == 200 and len(data["texts"]) == 1000
    assert all(len(t) == 5 for t in data["img2txt"])


# ---- protocol ----------------------------------------------------------------------------------------------------

def test_paper_k_test_per_family_and_dataset():
    assert retrieval.protocol_for("blip-itm", "coco").k_test == 256
    assert retrieval.protocol_for("blip-itm", "flickr30k").k_test == 128
    assert retrieval.protocol_for("blip2-itm", "coco").k_test == 128
    assert retrieval.protocol_for("blip2-itm", "flickr30k").k_test == 128
    assert retrieval.protocol_for("blip-itm", "coco", k_test=16).k_test == 16
    assert retrieval.protocol_for("blip-itm", "coco").itm_first_token == "[ENC]"
    assert retrieval.protocol_for("blip2-itm", "coco").itm_first_token is None
    with pytest.raises(UserError, match="cannot do retrieval"):
        retrieval.protocol_for("blip", "coco")


def test_k_test_larger_than_the_gallery_is_an_error(model_dirs):
    with pytest.raises(UserError, match="k_test 71 must be between 1 and the gallery size.*70 images"):
        evaluate(_cfg(model_dirs["tiny-blip-itm"], k_test=71))


def test_enc_id_falls_back_to_blip_30523_only_for_blip_tokenizers():
    proto = retrieval.protocol_for("blip-itm", "coco")
    proc = tiny.processor("shapes-bert")
    assert retrieval.itm_token_id(proc, proto) == proc.tokenizer.convert_tokens_to_ids("[ENC]")
    from transformers import BertTokenizer

    bare = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"])})
    with pytest.raises(UserError, match=r"no \[ENC\] token"):
        retrieval.itm_token_id(bare, proto)
    assert retrieval.itm_token_id(bare, proto, vocab_size=30524) == 30523  # BLIP's init_tokenizer layout


# ---- ITC top-k under a memory budget --------------------------------------------------------------------------------

@pytest.mark.parametrize("q_shape, g_shape", [((53, 16), (301, 16)), ((53, 4, 16), (301, 16)),
                                              ((53, 16), (301, 4, 16))])
def test_itc_topk_equals_a_full_matrix_topk_and_respects_the_budget(monkeypatch, q_shape, g_shape):
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(q_shape, generator=gen), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(g_shape, generator=gen), dim=-1)
    ref_v, ref_i = retrieval._sims(q, g).topk(7, dim=1)
    biggest, real_sims = [0], retrieval._sims
    monkeypatch.setattr(retrieval, "_sims", lambda a, b: (s := real_sims(a, b), biggest.append(s.numel()))[0])
    budget_mb = 0.02
    v, i = retrieval.itc_topk(q, g, 7, memory_mb=budget_mb)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(v, ref_v, atol=1e-6, rtol=0)
    n_per_pair = (q.shape[1] if q.dim() == 3 else 1) * (g.shape[1] if g.dim() == 3 else 1)
    assert max(biggest) * 4 * n_per_pair <= budget_mb * 2**20  # never the whole 53 x 301 matrix at once
    assert max(biggest) < 53 * 301


def test_itc_topk_rejects_k_beyond_the_gallery():
    with pytest.raises(UserError, match="k_test 11"):
        retrieval.itc_topk(torch.zeros(3, 4), torch.zeros(10, 4), 11)


# ---- score construction against a naive full computation --------------------------------------------------------

def _naive_scores(model, proc, data, family: str, k: int):
    """Every (image, text) pair through the HF forward; top-k of the full cosine matrix; score = ITM logit + cosine."""
    from blip_repro.zoo import family_of

    assert family_of(model) == family
    proto = retrieval.protocol_for(family, "shapes", k)
    px = proc.image_processor([readers.load_image(p) for p in data["images"]], return_tensors="pt")["pixel_values"]
    ids, mask = retrieval.tokenize(proc, data["texts"], proto)
    n_img, n_txt = len(px), len(ids)
    with torch.no_grad():
        if family == "blip-itm":
            cos = model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
            enc = ids.clone()
            enc[:, 0] = proc.tokenizer.convert_tokens_to_ids("[ENC]")
            itm = torch.stack([model(input_ids=enc, pixel_values=px[i:i + 1].expand(n_txt, -1, -1, -1),
                                     attention_mask=mask).itm_score[:, 1] for i in range(n_img)])
        else:
            cos = model(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image
            itm = torch.stack([model(pixel_values=px[i:i + 1].expand(n_txt, -1, -1, -1), input_ids=ids,
                                     attention_mask=mask, use_image_text_matching_head=True).logits_per_image[:, 1]
                               for i in range(n_img)])
    out = []
    for c, m in ((cos, itm), (cos.T, itm.T)):
        s = torch.full(c.shape, -100.0)
        top = c.topk(k, dim=1).indices
        s.scatter_(1, top, (c + m).gather(1, top))
        out.append(s)
    return out


@pytest.mark.parametrize("name, family", [("tiny-blip-itm", "blip-itm"), ("tiny-blip2-itm", "blip2-itm")])
def test_score_matrices_equal_the_naive_full_computation(model_dirs, name, family):
    from blip_repro import zoo

    cfg = _cfg(model_dirs[name], limit=12, k_test=4, itm_batch_size=7)  # ITM batches straddle queries
    m = evaluate(cfg)
    model, proc = zoo.load_model(model_dirs[name], "cpu")
    data = retrieval.read(cfg)
    ref_i2t, ref_t2i = _naive_scores(model, proc, data, family, 4)
    s_i2t, s_t2i = retrieval.load_scores(cfg.run_dir)
    assert torch.equal(s_i2t == -100, ref_i2t == -100) and torch.equal(s_t2i == -100, ref_t2i == -100)
    torch.testing.assert_close(s_i2t, ref_i2t, atol=2e-5, rtol=0)
    torch.testing.assert_close(s_t2i, ref_t2i, atol=2e-5, rtol=0)
    from blip_repro.metrics import recall_at_k

    assert {k: m[k] for k in ("tr_r1", "ir_r5", "r_mean")} == \
        {k: recall_at_k(ref_i2t, ref_t2i, data["txt2img"], data["img2txt"])[k] for k in ("tr_r1", "ir_r5", "r_mean")}
    preds = [json.loads(line) for line in (cfg.run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 + 60 and {p["direction"] for p in preds} == {"i2t", "t2i"}
    assert preds[0]["ranked"][0] == int(ref_i2t[0].argmax())
    prov = json.loads((cfg.run_dir / "provenance.json").read_text())
    assert prov["world_size"] == 1 and any(k.endswith("coco_karpathy_test.json") for k in prov["data_files"])
    assert not (cfg.run_dir / "stages").exists()  # the ViT tokens are deleted once topk.pt is written


def test_blip_itm_uses_enc_first_and_itc_uses_cls(model_dirs, tmp_path):
    """protocols.md §4.3: HF never inserts [ENC]; with [CLS] first, ITM logits move by up to 1.6 on real weights."""
    from blip_repro import zoo

    model, proc = zoo.load_model(model_dirs["tiny-blip-itm"], "cpu")
    seen = []
    model.text_encoder.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((kw.get("encoder_hidden_states") is not None, set(kw["input_ids"][:, 0].tolist()))),
        with_kwargs=True)
    cfg = _cfg(model_dirs["tiny-blip-itm"], limit=8, k_test=3)
    data = retrieval.read(cfg)
    retrieval.compute_topk(model, proc, data, retrieval.protocol_for("blip-itm", "shapes", 3), cfg, "blip-itm",
                           tmp_path / "stages")
    tok = proc.tokenizer
    itm_first = set().union(*(ids for grounded, ids in seen if grounded))
    itc_first = set().union(*(ids for grounded, ids in seen if not grounded))
    assert itm_first == {tok.convert_tokens_to_ids("[ENC]")}
    assert itc_first == {tok.cls_token_id}


# ---- resume after a crash in each stage ---------------------------------------------------------------------------

class Killed(Exception):
    pass


def _die_on_call(monkeypatch, name: str, n: int) -> list:
    """Replace retrieval.<name> by a wrapper counting calls and raising on call n (a kill at that point)."""
    real, calls = getattr(retrieval, name), []

    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise Killed(name)
        return real(*a, **kw)

    monkeypatch.setattr(retrieval, name, wrapper)
    return calls


@pytest.fixture(scope="module")
def clean_run(model_dirs, tmp_path_factory) -> tuple:
    """The uninterrupted run the resumed ones must equal (3 text chunks, so stage 2 has something to resume)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(retrieval, "TEXT_CHUNK", 128)
        m.setenv("BLIP_REPRO_OUTPUTS", str(tmp_path_factory.mktemp("clean")))
        cfg = _cfg(model_dirs["tiny-blip-itm"], itm_batch_size=64)
        return cfg, evaluate(cfg), torch.load(cfg.run_dir / "topk.pt")


@pytest.mark.parametrize("stage, n", [("_image_chunk", 2), ("_text_chunk", 2), ("itc_topk", 4), ("itm_logits", 9)])
def test_a_run_killed_in_any_stage_resumes_to_the_same_numbers(clean_run, tmp_path, monkeypatch, stage, n):
    cfg, clean, clean_topk = clean_run
    monkeypatch.setattr(retrieval, "TEXT_CHUNK", 128)
    monkeypatch.setenv("BLIP_REPRO_OUTPUTS", str(tmp_path / "killed"))
    with monkeypatch.context() as m:
        _die_on_call(m, stage, n)
        with pytest.raises(Killed):
            evaluate(cfg)
    assert list((cfg.run_dir / "stages").glob("*.tmp")) == []  # atomic writes: nothing half-written
    saved = {p.name for p in (cfg.run_dir / "stages").glob("*.pt")}
    calls = _die_on_call(monkeypatch, stage, 10**9)
    resumed = evaluate(cfg)
    total = {"_image_chunk": 2, "_text_chunk": 3, "itc_topk": 14}.get(stage)
    if total:  # finished chunks are not recomputed
        assert len(calls) == total - (n - 1)
    else:  # the chunk killed during ITM keeps its ITC top-k
        assert any(name.endswith(".itc.pt") for name in saved)
    assert {k: v for k, v in resumed.items() if k != "run_id"} == {k: v for k, v in clean.items() if k != "run_id"}
    topk = torch.load(cfg.run_dir / "topk.pt")
    for d in ("i2t", "t2i"):
        for key in ("indices", "itc", "itm"):
            assert torch.equal(topk[d][key], clean_topk[d][key]), (d, key)


# ---- training losses -----------------------------------------------------------------------------------------------

def test_hard_negatives_never_pick_a_caption_of_the_same_image():
    torch.manual_seed(0)
    idx = torch.tensor([0, 0, 1, 2, 2, 3]).view(-1, 1)
    positive = idx == idx.T
    sim = torch.randn(6, 6) + 20 * positive  # positives would dominate if they were not excluded
    for family in ("blip-itm", "blip2-itm"):
        for _ in range(50):
            neg = retrieval_losses._hard_negatives(sim, positive, family)
            assert not positive[torch.arange(6), neg].any()
    assert retrieval_losses._hard_negatives(sim[:2, :2], positive[:2, :2], "blip-itm").tolist() in \
        ([0, 0], [0, 1], [1, 0], [1, 1])  # a batch of one image: no negative exists, no crash


@pytest.mark.parametrize("name", ["tiny-blip-itm", "tiny-blip2-itm"])
def test_training_loss_without_a_process_group_learns_a_batch(name):
    from blip_repro import dist
    from blip_repro.train import TrainConfig

    assert not dist.is_initialized()
    model, proc = tiny.build(name)
    model.train()
    cfg = TrainConfig(task="retrieval", model=name, max_steps=1, limit=40)
    family = "blip2-itm" if "blip2" in name else "blip-itm"
    examples = retrieval_losses.train_examples(cfg, proc)
    assert len({e["image_index"] for e in examples}) == 8  # 5 captions per shapes image share its index
    batch = retrieval_losses.train_batch_for(proc, examples[:16], cfg, family)
    if family == "blip-itm":
        assert (batch["itm_input_ids"][:, 0] == proc.tokenizer.convert_tokens_to_ids("[ENC]")).all()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    torch.manual_seed(0)
    losses = []
    for _ in range(8):
        loss = retrieval_losses.train_loss(model, batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
    assert "forward" not in vars(model)  # the loss's temporary forward is gone again


def test_training_at_world_size_1_says_the_negatives_come_from_the_local_batch(tmp_path, capsys):
    """protocols.md §1.9: BLIP gathers ITC negatives and samples ITM hard negatives across GPUs; one process sees
    only its own batch, which changes what is learned, so the run says so on screen and in its log."""
    from blip_repro.train import TrainConfig, finetune

    shapes.generate()
    model = tiny.build("tiny-blip-itm", save_to=tmp_path / "untrained")
    result = finetune(TrainConfig(task="retrieval", model=str(model), dataset="shapes", max_steps=1, batch_size=8,
                                  limit=40, output_dir=str(tmp_path / "run")))
    assert result["world_size"] == 1 and result["steps"] == 1
    assert "negatives come from the local batch only" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "note" and "local batch" in e["message"] for e in log)
