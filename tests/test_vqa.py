"""VQA task without models: the protocols (snapshots), question preprocessing, OK-VQA lemmatization, the readers of
the official formats, scoring (doubled OK-VQA answers, GQA rules, per type), the majority control and the server
file of the VQAv2 test splits."""
import json

import pytest

from blip_repro import runs
from blip_repro.data import readers
from blip_repro.errors import UserError
from blip_repro.tasks import vqa, vqa_score


def test_protocol_snapshots():
    """A changed prompt or decoding setting silently changes zero-shot numbers (protocols.md §1.5, §2.2)."""
    t5, opt, blip = vqa.PROTOCOLS["blip2-t5"], vqa.PROTOCOLS["blip2-opt"], vqa.PROTOCOLS["blip-vqa"]
    assert t5.prompt == opt.prompt == "Question: {} Short answer:"
    assert (t5.num_beams, t5.max_length, t5.min_length, t5.length_penalty, t5.image_size) == (5, 10, 1, -1.0, 224)
    assert (opt.num_beams, opt.max_length, opt.min_length, opt.length_penalty, opt.image_size) == (5, 10, 1, 0.0, 224)
    assert t5.inference == opt.inference == "generate"
    assert (blip.inference, blip.k_test, blip.num_beams, blip.max_length, blip.min_length, blip.image_size) == \
        ("rank", 128, 3, 10, 1, 480)
    assert vqa.PAPER_OPT_PROMPT == "Question: {} Answer:" and vqa.PAPER_LENGTH_PENALTY == -1.0
    assert vqa.LEMMATIZE_BY_DEFAULT == {"vqav2": False, "okvqa": True, "gqa": False}
    paper_opt = vqa.protocol_for("blip2-opt", {"prompt": vqa.PAPER_OPT_PROMPT, "length_penalty": -1.0})
    assert paper_opt.prompt.format("what is it?") == "Question: what is it? Answer:"


def test_protocol_options_are_checked():
    with pytest.raises(UserError, match="needs a BLIP VQA model"):
        vqa.protocol_for("blip2-t5", {"inference": "rank"})
    with pytest.raises(UserError, match="no '{}'"):
        vqa.protocol_for("blip2-opt", {"prompt": "Question: Answer:"})
    with pytest.raises(UserError, match="generate, rank"):
        vqa.protocol_for("blip-vqa", {"inference": "beam"})
    with pytest.raises(UserError, match="cannot answer questions"):
        vqa.protocol_for("blip", {})
    assert vqa.protocol_for("blip-vqa", {"inference": "generate", "k_test": None}).inference == "generate"


def test_pre_question_as_blip_and_lavis():
    assert vqa.pre_question('What is the man\'s "hat" (color)?!  ') == "what is the man's hat color?"
    assert vqa.pre_question("Is it a dog; a cat: or ~ a #1 * bird.") == "is it a dog a cat or  a 1  bird"
    long = " ".join(f"w{i}" for i in range(60))
    assert vqa.pre_question(long).split(" ") == [f"w{i}" for i in range(50)]


def test_lemmatize_nouns_and_verbs_only():
    out = vqa.lemmatize(["bananas", "dogs running", "red", "sleeping on the couches", "2"])
    assert out == ["banana", "dog run", "red", "sleep on the couch", "2"]
    assert [vqa.lemmatize([a])[0] for a in ["bananas", "dogs running"]] == out[:2]  # batching changes nothing
    assert "en_core_web_sm" in vqa.lemmatizer_name()


def _vqa_files(tmp_path, subtype="val2014", answers=None, extra_question=False):
    answers = answers or [["two"] * 10, ["yes"] * 9 + ["no"]]
    questions = [{"image_id": 42, "question": "How many dogs?", "question_id": 420},
                 {"image_id": 7, "question": "Is it sunny?", "question_id": 70}]
    if extra_question:
        questions.append({"image_id": 7, "question": "Why?", "question_id": 71})
    anns = [{"question_id": q, "image_id": i, "question_type": t, "answer_type": at, "multiple_choice_answer": a[0],
             "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1} for k, x in enumerate(a)]}
            for (q, i, t, at), a in zip([(420, 42, "how many", "number"), (70, 7, "is it", "yes/no")], answers)]
    qf, af = tmp_path / "q.json", tmp_path / "a.json"
    qf.write_text(json.dumps({"data_subtype": subtype, "questions": questions}))
    af.write_text(json.dumps({"annotations": anns}))
    return qf, af


def test_read_vqa_official_format(tmp_path):
    qf, af = _vqa_files(tmp_path)
    recs = readers.read_vqa(qf, af, tmp_path / "coco")
    assert [r["question_id"] for r in recs] == [420, 70]
    assert recs[0]["image"] == tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg"
    assert recs[0]["answers"] == ["two"] * 10 and recs[0]["answer_type"] == "number"
    assert recs[1]["question_type"] == "is it" and recs[1]["multiple_choice_answer"] == "yes"
    assert len(readers.read_vqa(qf, af, tmp_path, limit=1)) == 1
    qf, _ = _vqa_files(tmp_path, subtype="test-dev2015")
    recs = readers.read_vqa(qf, None, tmp_path / "coco")
    assert recs[0]["image"].parts[-2:] == ("test2015", "COCO_test2015_000000000042.jpg") and recs[0]["answers"] == []


def test_read_vqa_bad_input_names_the_id_and_file(tmp_path):
    qf, af = _vqa_files(tmp_path, extra_question=True)
    with pytest.raises(UserError, match=r"a\.json: no annotation for question_id 71 of .*q\.json"):
        readers.read_vqa(qf, af, tmp_path)
    qf, af = _vqa_files(tmp_path)
    data = json.loads(af.read_text())
    data["annotations"][1]["answers"][3]["answer"] = 3
    af.write_text(json.dumps(data))
    with pytest.raises(UserError, match="question_id 70 has answers that are not"):
        readers.read_vqa(qf, af, tmp_path)
    qf.write_text(json.dumps({"questions": []}))
    with pytest.raises(UserError, match="data_subtype"):
        readers.read_vqa(qf, None, tmp_path)


def test_read_gqa_and_answer_list(tmp_path):
    f = tmp_path / "testdev_balanced_questions.json"
    f.write_text(json.dumps({"201": {"imageId": "n161313", "question": "Is the sky blue?", "answer": "yes",
                                     "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}}}))
    (rec,) = readers.read_gqa(f, tmp_path / "images")
    assert rec == {"question_id": "201", "image_id": "n161313", "image": tmp_path / "images" / "n161313.jpg",
                   "question": "Is the sky blue?", "answer": "yes", "question_type": "verifyAttr",
                   "structural_type": "verify"}
    (tmp_path / "al.json").write_text(json.dumps(["yes", "no", "yes"]))
    with pytest.raises(UserError, match="'yes' is listed twice"):
        readers.read_answer_list(tmp_path / "al.json")
    (tmp_path / "al.json").write_text(json.dumps({"yes": 1}))
    with pytest.raises(UserError, match="not an answer list"):
        readers.read_answer_list(tmp_path / "al.json")


def test_dataset_and_split_names():
    with pytest.raises(UserError, match="shapes-vqav2"):
        readers.vqa_benchmark("shapes")
    with pytest.raises(UserError, match="valid splits: train, val, test-dev, test"):
        readers.vqa_paths("vqav2", "testdev")
    q, a, images = readers.vqa_paths("okvqa", "test")
    assert (q.name, a.name, images.name) == ("OpenEnded_mscoco_val2014_questions.json",
                                            "mscoco_val2014_annotations.json", "coco")
    assert readers.vqa_paths("gqa", "test-dev")[0].name == "testdev_balanced_questions.json"


def test_okvqa_doubled_answers_and_lemmatization_score_as_lavis():
    """5 answers stored twice: one annotator = 2 slots = 0.6; two or more = 1.0; the plural only after lemmas."""
    five = ["banana", "banana", "plantain", "fruit", "banana"]
    recs = [{"question_id": 1, "answers": [a for a in five for _ in (0, 1)], "answer_type": "other",
             "question_type": "fruit"}]
    assert vqa_score.score(recs, {1: "plantain"}, "okvqa")["vqa_acc"] == 60.0
    assert vqa_score.score(recs, {1: "bananas"}, "okvqa")["vqa_acc"] == 0.0
    assert vqa_score.score(recs, {1: vqa.lemmatize(["bananas"])[0]}, "okvqa")["vqa_acc"] == 100.0


def test_gqa_scores_per_type_and_rule():
    recs = [{"question_id": "1", "answer": "left", "question_type": "position", "structural_type": "query"},
            {"question_id": "2", "answer": "yes", "question_type": "background", "structural_type": "verify"},
            {"question_id": "3", "answer": "two", "question_type": "count", "structural_type": "query"}]
    out = vqa_score.score(recs, {"1": "Left.", "2": "no", "3": "two"}, "gqa")
    # paper-era rule: prediction normalized ("two" -> "2"), ground truth raw ("two"): only "Left." matches
    assert out["rule"] == "lavis2023feb" and out["n_questions"] == 3
    assert out["gqa_acc"] == pytest.approx(100 / 3)
    assert out["per_question_type"] == {"position": 100.0, "background": 0.0, "count": 0.0}
    assert out["per_structural_type"] == {"query": 50.0, "verify": 0.0}
    assert vqa_score.score(recs, {"1": "Left.", "2": "no", "3": "two"}, "gqa", gqa_rule="lavis2023dec")[
        "gqa_acc"] == pytest.approx(200 / 3)


def test_majority_control_is_per_question_type():
    train = [{"question_type": "how many", "answers": ["2"] * 10, "multiple_choice_answer": "2"},
             {"question_type": "how many", "answers": ["3"] * 10, "multiple_choice_answer": "3"},
             {"question_type": "how many", "answers": ["3"] * 10, "multiple_choice_answer": "3"},
             {"question_type": "is there", "answers": ["no"] * 10, "multiple_choice_answer": "no"}]
    table, overall = vqa_score.majority_by_type(train)
    assert table == {"how many": "3", "is there": "no"} and overall == "3"


def test_test_dev_run_writes_the_server_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_REPRO_OUTPUTS", str(tmp_path))
    cfg = runs.eval_config("vqa", notebook="vqav2", model="tiny-blip2-opt", dataset="vqav2", split="test-dev")
    recs = [{"question_id": 5, "answers": []}, {"question_id": 9, "answers": []}]
    preds = {5: {"question_id": 5, "answer": "yes"}, 9: {"question_id": 9, "answer": "2"}}
    out = vqa_score.score_run(recs, preds, cfg, "blip2-opt")
    assert out["vqa_acc"] is None and out["n_questions"] == 2 and out["lemmatize"] is False
    path = cfg.run_dir / "vqa_OpenEnded_mscoco_test-dev2015_tiny-blip2-opt_results.json"
    assert out["server_file"] == str(path) and "upload" in out["vqa_acc_note"] and "eval.ai" in out["vqa_acc_note"]
    assert json.loads(path.read_text()) == [{"question_id": 5, "answer": "yes"}, {"question_id": 9, "answer": "2"}]


def test_partial_or_bad_predictions_are_refused():
    recs = [{"question_id": 1, "answers": ["a"] * 10}, {"question_id": 2, "answers": ["b"] * 10}]
    with pytest.raises(UserError, match="no prediction for question_id 2"):
        vqa_score.score(recs, {1: "a"}, "vqav2")
    with pytest.raises(UserError, match="has 9 answers"):
        vqa_score.score([{"question_id": 1, "answers": ["a"] * 9}], {1: "a"}, "vqav2")
    with pytest.raises(UserError, match="not a string"):
        vqa_score.score(recs, {1: "a", 2: 2}, "vqav2")


def test_bad_scoring_choice_fails_before_predicting():
    cfg = runs.eval_config("vqa", model="tiny-blip2-opt", dataset="shapes-gqa", split="test-dev", gqa_rule="exact")
    with pytest.raises(UserError, match="gqa_rule='exact' is not one of lavis2023feb"):
        vqa.records(cfg)


def test_shapes_splits_read_like_the_real_files():
    for dataset, split, n_min in (("shapes-vqav2", "val", 500), ("shapes-okvqa", "test", 100),
                                  ("shapes-gqa", "test-dev", 400)):
        recs = vqa.read(dataset, split)
        assert len(recs) >= n_min and all(r["image"].exists() for r in recs[:20])
    assert all(len(r["answers"]) == 10 for r in vqa.read("shapes-okvqa", "test"))
    answer_list = readers.read_answer_list(vqa.answer_list_path("shapes-vqav2"))
    assert {"yes", "no", "red", "circle"} <= set(answer_list)
