"""The built-in benchmark: deterministic, in the real formats, read by the real readers."""
import json

from blip_repro.data import readers, shapes


def test_generation_is_deterministic(tmp_path):
    a, b = shapes.generate(tmp_path / "a"), shapes.generate(tmp_path / "b")
    for rel in ("annotations/coco_karpathy_test.json", "annotations/coco_karpathy_train.json",
                "vqav2/v2_mscoco_val2014_annotations.json", "okvqa/mscoco_val2014_annotations.json",
                "gqa/testdev_balanced_questions.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for img in ("test/shapes_test_000000000007.jpg", "train/shapes_train_000000100042.jpg"):
        assert (a / "images" / img).read_bytes() == (b / "images" / img).read_bytes()


def test_generate_is_idempotent_and_versioned(tmp_path):
    root = shapes.generate(tmp_path)
    stamp = (root / "annotations/coco_karpathy_test.json").stat().st_mtime_ns
    shapes.generate(tmp_path)
    assert (root / "annotations/coco_karpathy_test.json").stat().st_mtime_ns == stamp
    assert (root / "VERSION").read_text().strip() == str(shapes.VERSION)


def test_karpathy_reader_reads_shapes(tmp_path):
    root = shapes.generate(tmp_path)
    recs = readers.read_karpathy_captions(root / "annotations/coco_karpathy_test.json", root / "images",
                                          root / "annotations/coco_karpathy_test_gt.json")
    assert len(recs) == shapes.SPLITS["test"][0]
    assert all(len(r["captions"]) == 5 and r["image"].exists() for r in recs)
    assert recs[0]["image_id"] == 1 and readers.load_image(recs[0]["image"]).size == (64, 64)


def test_every_caption_names_every_object():
    import random

    rng = random.Random(5)
    for i in range(50):
        scene = shapes.sample_scene(rng, i, "test")
        for cap in shapes.captions(scene):
            for o in scene.objects:
                assert o.colour in cap and o.shape in cap, (cap, o)


def test_vqa_answers_have_ten_annotators_with_some_disagreement(tmp_path):
    root = shapes.generate(tmp_path)
    anns = json.loads((root / "vqav2/v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    assert all(len(a["answers"]) == 10 for a in anns)
    assert {a["answer_type"] for a in anns} == {"yes/no", "number", "other"}
    assert any(len({x["answer"] for x in a["answers"]}) > 1 for a in anns)
    ok = json.loads((root / "okvqa/mscoco_val2014_annotations.json").read_text())["annotations"]
    five = [x["answer"] for x in ok[0]["answers"]][::2]
    assert [x["answer"] for x in ok[0]["answers"]] == [a for a in five for _ in (0, 1)]  # 5 answers stored twice


def test_vocabulary_covers_all_texts(tmp_path):
    vocab = set(shapes.vocabulary())
    root = shapes.generate(tmp_path)
    texts = [c for r in json.loads((root / "annotations/coco_karpathy_test.json").read_text()) for c in r["caption"]]
    texts += [q["question"] for q in json.loads(
        (root / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]]
    for t in texts:
        for w in t.replace("?", " ? ").replace(",", " , ").replace(":", " : ").split():
            assert w in vocab, w
