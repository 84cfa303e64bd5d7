"""caption_scores against pycocoevalcap's own COCOEvalCap on the same captions (protocols.md §1.4), the offline
SPICE path (environment.md §4) and the input checks. Needs java (PTBTokenizer, METEOR), as on every project machine."""
import contextlib
import io

import pycocoevalcap.eval
import pytest
from pycocotools.coco import COCO

from blip_repro import metrics_caption
from blip_repro.errors import UserError
from blip_repro.metrics import caption_scores

REFERENCES = {
    391895: ["A man with a red helmet on a small moped on a dirt road.",
             "Man riding a motor bike on a dirt road on the countryside.",
             "A man riding on the back of a motorcycle."],
    522418: ["A woman wearing a net on her head cutting a cake.", "A woman cutting a large white sheet cake.",
             "A woman marking a cake with the back of a chef's knife."],
    184613: ["A child holding a flowered umbrella and petting a yak.",
             "A young man holding an umbrella next to a herd of cattle."],
    318219: ["A young boy standing in front of a computer keyboard.", "a little boy wearing headphones and looking "
             "at a computer monitor", "He is listening intently to the computer at school."],
}
CANDIDATES = {
    391895: "a man riding a motorcycle on a dirt road",
    522418: "A woman cutting a cake, with a knife!",
    184613: "a boy holding an umbrella next to cows",
    318219: "a child looks at a computer",
}


class _NoSpice:
    """Stands in for pycocoevalcap's Spice inside COCOEvalCap, which would try to download CoreNLP."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


def coco_eval_cap(references, candidates, monkeypatch):
    """The official pipeline: COCO-format ground truth and results, then COCOEvalCap.evaluate()."""
    images = [{"id": i} for i in references]
    anns = [{"id": n, "image_id": i, "caption": c} for n, (i, c) in
            enumerate((i, c) for i, refs in references.items() for c in refs)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        results = coco.loadRes([{"image_id": i, "caption": c} for i, c in candidates.items()])
        monkeypatch.setattr(pycocoevalcap.eval, "Spice", _NoSpice)
        evaluator = pycocoevalcap.eval.COCOEvalCap(coco, results)
        evaluator.evaluate()
    return evaluator.eval


@pytest.fixture(scope="module")
def ours():
    return caption_scores(REFERENCES, CANDIDATES)


def test_equals_cocoevalcap(ours, monkeypatch):
    official = coco_eval_cap(REFERENCES, CANDIDATES, monkeypatch)
    names = {"bleu1": "Bleu_1", "bleu2": "Bleu_2", "bleu3": "Bleu_3", "bleu4": "Bleu_4", "meteor": "METEOR",
             "rouge_l": "ROUGE_L", "cider": "CIDEr"}
    assert {k: ours[k] for k in names} == {k: official[v] for k, v in names.items()}
    assert ours["n_images"] == 4
    assert 0 < ours["bleu4"] < ours["bleu1"] < 1 and ours["cider"] > 0.5  # the pycocoevalcap scale, not percent


def test_spice_reported_unavailable_without_corenlp(ours):
    # This machine has no CoreNLP 3.6.0 jars (environment.md §4): SPICE is None with a note, and no download ran.
    if metrics_caption.spice_missing_note() is None:
        pytest.skip("CoreNLP jars are installed here")
    assert ours["spice"] is None
    assert ours["spice_note"].startswith("SPICE unavailable: needs Stanford CoreNLP 3.6.0 models")


def test_spice_note_names_the_jars_and_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics_caption, "spice_lib_dir", lambda: tmp_path)
    note = metrics_caption.spice_missing_note()
    assert "stanford-corenlp-3.6.0-models.jar" in note and str(tmp_path) in note
    for name in metrics_caption.SPICE_JARS:
        (tmp_path / name).write_bytes(b"")
    assert metrics_caption.spice_missing_note() is None


def test_spice_runs_when_the_jars_exist(monkeypatch, tmp_path):
    for name in metrics_caption.SPICE_JARS:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(metrics_caption, "spice_lib_dir", lambda: tmp_path)
    monkeypatch.setattr(metrics_caption, "_meteor", lambda gts, res: 0.5)  # skip the 5 s JVM: SPICE is tested

    class FakeSpice:
        def compute_score(self, gts, res):
            assert sorted(gts) == sorted(REFERENCES) and res[184613] == ["a boy holding an umbrella next to cows"]
            return 0.25, []

    monkeypatch.setattr("pycocoevalcap.spice.spice.Spice", FakeSpice)
    out = caption_scores(REFERENCES, CANDIDATES)
    assert (out["spice"], out["spice_note"]) == (0.25, None)
    assert caption_scores(REFERENCES, CANDIDATES, spice=False)["spice"] is None


@pytest.mark.parametrize("references, candidates, message", [
    (REFERENCES, {**CANDIDATES, 7: "extra"}, "image id 7, which has no references"),
    (REFERENCES, {k: v for k, v in CANDIDATES.items() if k != 522418}, "no candidate caption for image id 522418"),
    ({1: "a single string"}, {1: "a cat"}, r"references\[1\] must be a non-empty list"),
    ({1: []}, {1: "a cat"}, r"references\[1\] must be a non-empty list"),
    ({1: ["a cat"]}, {1: None}, r"candidates\[1\] must be a string"),
    ({}, {}, "references is empty"),
])
def test_rejects_bad_input(references, candidates, message):
    with pytest.raises(UserError, match=message):
        caption_scores(references, candidates)


def test_missing_java_says_how_to_install(monkeypatch):
    monkeypatch.setattr(metrics_caption.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="default-jre-headless"):
        caption_scores(REFERENCES, CANDIDATES)
