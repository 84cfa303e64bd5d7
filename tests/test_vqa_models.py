"""VQA with the tiny models: batch size never changes an answer (BLIP-2 with padded prompts; BLIP generate and rank
with padded questions), the cross-attention padding fix (protocols.md §4.3 item 2), `[ENC]` first, the training
batches and BLIP's answer-weighted loss, and the tiny models' construction."""
import contextlib

import pytest
import torch

from blip_repro import tiny, zoo
from blip_repro.data import readers, shapes
from blip_repro.tasks import vqa, vqa_blip, vqa_train


def _questions(n=12, dataset="shapes-vqav2", split="val"):
    recs = vqa.read(dataset, split)[:n]
    assert len({len(r["question"].split()) for r in recs}) > 1  # different lengths: a batch pads
    return [readers.load_image(r["image"]) for r in recs], [r["question"] for r in recs]


@pytest.mark.parametrize("name", ["tiny-blip2-opt", "tiny-blip2-t5"])
def test_blip2_batch_size_never_changes_an_answer(name):
    model, proc = zoo.load_model(name, device="cpu")
    family = zoo.family_of(model)
    images, questions = _questions()
    p = vqa.protocol_for(family)
    one = [vqa.answer_blip2(model, proc, [im], [q], p, family)[0] for im, q in zip(images, questions)]
    many = vqa.answer_blip2(model, proc, images, questions, p, family)
    assert one == many
    assert len(set(many)) >= 3  # the answers depend on the question and image
    assert not any(w in a for a in many for w in ("question", "answer", ":"))  # the prompt is stripped


@pytest.mark.parametrize("name,pad_first", [("tiny-blip2-opt", True), ("tiny-blip2-t5", False)])
def test_blip2_padding_side(name, pad_first, monkeypatch):
    """OPT pads on the left of the prompt (LAVIS), T5 on the right (a pad between the image tokens and the prompt
    would move T5's relative positions)."""
    model, proc = zoo.load_model(name, device="cpu")
    seen = {}
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.update(kw) or real(**kw))
    images, questions = _questions(2)
    vqa.answer_blip2(model, proc, images, questions, vqa.protocol_for(zoo.family_of(model)), zoo.family_of(model))
    mask = seen["attention_mask"]
    short = int(mask.sum(1).argmin())
    zeros = (mask[short] == 0).nonzero().flatten()
    assert len(zeros) > 0
    assert (int(zeros[-1]) < mask.shape[1] - 1) == pad_first
    assert proc.tokenizer.padding_side == "right"  # restored afterwards


def test_blip_rank_ignores_padded_question_states(monkeypatch):
    """Rank scores of a padded batch equal one-question-at-a-time scores; without the mask fix they do not (HF 5.23
    lets the answer decoder attend to padded question states)."""
    model, proc = zoo.load_model("tiny-blip-vqa", device="cpu")
    images, questions = _questions(8)
    answer_list = readers.read_answer_list(vqa.answer_list_path("shapes-vqav2"))
    a_ids, a_mask = vqa_blip.answer_inputs(proc, answer_list)
    px = proc(images=images, return_tensors="pt")["pixel_values"]

    def scores_batched():
        ids, mask = vqa_blip.question_inputs(proc, questions)
        assert (mask == 0).any()
        states = vqa_blip.question_states(model, px, ids, mask)
        return vqa_blip.candidate_scores(model.text_decoder, states, mask, a_ids, a_mask, 6)

    with torch.no_grad():
        singles = []
        for i, q in enumerate(questions):
            ids, mask = vqa_blip.question_inputs(proc, [q])
            states = vqa_blip.question_states(model, px[i:i + 1], ids, mask)
            singles.append(vqa_blip.candidate_scores(model.text_decoder, states, mask, a_ids, a_mask, 6))
        top, scores = scores_batched()
        assert torch.equal(top, torch.cat([t for t, _ in singles]))
        assert torch.allclose(scores, torch.cat([s for _, s in singles]), atol=1e-4)
        monkeypatch.setattr(vqa_blip, "question_padding_mask", lambda *a: contextlib.nullcontext())
        _, unmasked = scores_batched()
    assert (unmasked - torch.cat([s for _, s in singles])).abs().max() > 1e-3


@pytest.mark.parametrize("inference", ["rank", "generate"])
def test_blip_answers_do_not_depend_on_batch_size_and_start_with_enc(inference):
    model, proc = zoo.load_model("tiny-blip-vqa", device="cpu")
    images, questions = _questions(10)
    answer_list = readers.read_answer_list(vqa.answer_list_path("shapes-vqav2"))
    p = vqa.protocol_for("blip-vqa", {"inference": inference})
    first_tokens = []
    model.text_encoder.register_forward_pre_hook(
        lambda m, a, kw: first_tokens.append(kw["input_ids"][:, 0].clone()), with_kwargs=True)
    many = vqa_blip.answer(model, proc, images, questions, p, answer_list)
    one = [vqa_blip.answer(model, proc, [im], [q], p, answer_list)[0] for im, q in zip(images, questions)]
    assert one == many and len(set(many)) >= 3
    enc = proc.tokenizer.convert_tokens_to_ids("[ENC]")
    assert all((t == enc).all() for t in first_tokens)
    if inference == "rank":
        assert set(many) <= set(answer_list)


def test_enc_id_for_hub_tokenizers_without_it():
    from transformers import BertTokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "[DEC]"])}
    tok = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    assert vqa_blip.enc_token_id(tok) == 8  # BLIP: [DEC] 30522 -> [ENC] 30523
    assert vqa_blip.enc_token_id(tiny.processor("shapes-bert").tokenizer) == \
        tiny.processor("shapes-bert").tokenizer.convert_tokens_to_ids("[ENC]")


def _train_examples(n):
    recs = vqa.read("shapes-vqav2", "train")[:n]
    return [{"image": r["image"], "question": r["question"], "answer": r["multiple_choice_answer"],
             "answers": r["answers"]} for r in recs]


def test_blip_training_batch_and_loss_as_blip(monkeypatch):
    model, proc = zoo.load_model("tiny-blip-vqa", device="cpu")
    assert vqa_blip.answer_weights(["yes"] * 9 + ["no"]) == [("yes", 0.9), ("no", 0.1)]
    examples = [e for e in _train_examples(40) if len(set(e["answers"])) > 1][:1] + _train_examples(4)
    px = torch.stack([proc(images=readers.load_image(e["image"]), return_tensors="pt")["pixel_values"][0]
                      for e in examples])
    batch = vqa_blip.train_batch(proc, examples, px)
    assert len(batch["answer_weights"]) > len(examples)  # one row per distinct answer
    assert (batch["input_ids"][:, 0] == proc.tokenizer.convert_tokens_to_ids("[ENC]")).all()
    assert (batch["answer_ids"][:, 0] == proc.tokenizer.bos_token_id).all()  # the decoder starts from [DEC]
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        together = vqa_blip.train_loss(model, batch).item()
        alone = [vqa_blip.train_loss(model, vqa_blip.train_batch(proc, [e], px[i:i + 1])).item()
                 for i, e in enumerate(examples)]
        # sum of weighted answer losses / #questions: the padded batch equals the questions one at a time
        assert together * len(examples) == pytest.approx(sum(alone), rel=1e-5)
        monkeypatch.setattr(vqa_blip, "question_padding_mask", lambda *a: contextlib.nullcontext())
        unmasked = vqa_blip.train_loss(model, batch).item()
    assert abs(unmasked * len(examples) - sum(alone)) > 1e-3


def test_blip2_training_batches_predict_only_the_answer():
    examples = _train_examples(3)
    for family, kind in (("blip2-opt", "shapes-opt"), ("blip2-t5", "shapes-t5")):
        proc = tiny.processor(kind)
        tok = proc.tokenizer
        b = vqa_train._blip2_batch(proc, examples, vqa.PROTOCOLS[family].prompt, family)
        for row, e in enumerate(examples):
            kept = [int(i) for i in b["labels"][row] if i != -100]
            assert tok.decode(kept[:-1]) == e["answer"] and kept[-1] == tok.eos_token_id
            prompt = tok.decode(b["input_ids"][row][b["attention_mask"][row] == 1], skip_special_tokens=True)
            assert prompt.startswith("question : " + vqa.pre_question(e["question"]).replace("?", " ?"))
        image = tok.convert_tokens_to_ids("<image>")
        assert (b["input_ids"][:, :proc.num_query_tokens] == image).all()


def test_committed_blip2_processors_equal_a_fresh_build():
    for kind in ("shapes-opt", "shapes-t5"):
        committed, fresh = tiny.processor(kind), tiny.build_processor(kind)
        assert committed.tokenizer.get_vocab() == fresh.tokenizer.get_vocab()
        assert len(committed.tokenizer) == 4 + len(shapes.vocabulary())
        assert committed.tokenizer.convert_tokens_to_ids("<image>") == 3 and committed.num_query_tokens == 8
        text = "Question: what shape is red? Short answer:"
        assert committed.tokenizer(text)["input_ids"] == fresh.tokenizer(text)["input_ids"]
        assert committed.tokenizer.unk_token_id not in committed.tokenizer(text)["input_ids"]


def test_tiny_blip2_sees_through_tiny_blips_vision_tower():
    from transformers import BlipForConditionalGeneration

    model, proc = tiny.build("tiny-blip2-opt")
    src = BlipForConditionalGeneration.from_pretrained(tiny.checkpoint("tiny-blip"))
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.vision_model(pixel_values=px).last_hidden_state,
                              src.vision_model(pixel_values=px).last_hidden_state, atol=1e-5)
    assert type(model).__name__ == "Blip2ForConditionalGeneration" and model.config.image_token_index == 3
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
