"""Captioning task: paper protocols, the training batch BLIP builds, batch-size invariance, prompt stripping."""
import torch

from blip_repro import tiny, zoo
from blip_repro.data import readers, shapes
from blip_repro.tasks import captioning


def test_paper_protocols_snapshot():
    b, n, b2 = captioning.PROTOCOLS["blip"], captioning.PROTOCOLS["blip-nocaps"], captioning.PROTOCOLS["blip2"]
    assert (b.prompt, b.num_beams, b.max_length, b.min_length, b.repetition_penalty) == ("a picture of ", 3, 20, 5, 1.0)
    assert b.lengths_include_prompt and n.repetition_penalty == 1.1
    assert (b2.prompt, b2.num_beams, b2.max_length, b2.min_length, b2.image_size) == ("a photo of", 5, 30, 8, 364)
    assert not b2.lengths_include_prompt
    assert captioning.protocol_for("blip", "nocaps") == n
    assert captioning.protocol_for("blip", "coco", {"num_beams": 1}).num_beams == 1


def _examples(n=4):
    proc = tiny.processor("shapes-bert")
    root = shapes.generate()
    recs = readers.read_caption_train(root / "annotations/coco_karpathy_train.json", root / "images", limit=n)
    return proc, [dict(r, pixel_values=torch.zeros(3, 64, 64)) for r in recs]


def test_training_batch_starts_with_dec_and_masks_the_prompt():
    proc, ex = _examples()
    batch = captioning.train_batch(proc, ex, captioning.PROTOCOLS["blip"])
    tok = proc.tokenizer
    assert (batch["input_ids"][:, 0] == tok.convert_tokens_to_ids("[DEC]")).all()
    # "[DEC] a picture of" are not predicted; the first caption word is
    assert (batch["labels"][:, :4] == -100).all() and (batch["labels"][:, 4] != -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_training_forward_feeds_dec_to_the_decoder():
    """HF's forward does not swap [CLS] for [DEC] (only generate does); BLIP trains on [DEC] (shapes.md §3.2)."""
    proc, ex = _examples()
    model, _ = tiny.build("tiny-blip")
    seen = []
    model.text_decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"][:, 0].clone()),
                                                 with_kwargs=True)
    loss = captioning.loss(model, captioning.train_batch(proc, ex, captioning.PROTOCOLS["blip"]))
    assert torch.isfinite(loss)
    assert (seen[0] == proc.tokenizer.convert_tokens_to_ids("[DEC]")).all()
    assert model.text_decoder.label_smoothing == 0.1


def test_batch_size_never_changes_a_caption():
    model, proc = zoo.load_model("tiny-blip", device="cpu")
    root = shapes.generate()
    recs = readers.read_karpathy_captions(root / "annotations/coco_karpathy_test.json", root / "images", limit=9)
    images = [readers.load_image(r["image"]) for r in recs]
    p = captioning.PROTOCOLS["blip"]
    one = [captioning.predict(model, proc, [im], p, "blip")[0] for im in images]
    many = captioning.predict(model, proc, images, p, "blip")
    assert one == many
    assert all(not c.startswith("a picture of") for c in many)  # the prompt is stripped
    assert len(set(many)) > 3  # the captions depend on the image
