"""The evaluation loop: run folders, resume after a kill, and bad input (one clear line, nothing lost)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from blip_repro import runs
from blip_repro.data import shapes
from blip_repro.errors import UserError
from blip_repro.evaluate import evaluate, read_predictions
from blip_repro.runs import EvalConfig, eval_config_from_file


def _cfg(fresh=False, **kw):
    base = dict(task="captioning", model="tiny-blip", dataset="shapes", limit=12, batch_size=4,
                notebook="captioning-test")
    cfg = EvalConfig(**{**base, **kw})
    if fresh:  # the session cache keeps runs between test sessions: start these from nothing
        import shutil

        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return cfg


def test_run_writes_everything_and_is_reused(monkeypatch):
    cfg = _cfg(fresh=True, limit=8, seed=1)
    m = evaluate(cfg)
    files = {p.name for p in cfg.run_dir.iterdir()}
    assert {"config.yaml", "predictions.jsonl", "metrics.json", "provenance.json"} <= files
    assert m["n_scored"] == 8 and len(cfg.run_dir.joinpath("predictions.jsonl").read_text().splitlines()) == 8
    prov = json.loads((cfg.run_dir / "provenance.json").read_text())
    assert prov["libraries"]["transformers"] == "5.23.0" and prov["data_files"] and prov["wall_time_s"] > 0
    import blip_repro.evaluate as ev

    monkeypatch.setattr(ev, "evaluate", lambda c: pytest.fail("a finished run must be reused"))
    assert runs.run_or_load(cfg) == m


def test_killed_run_resumes_without_duplicates(tmp_path):
    """SIGKILL half-way through, then resume: every record predicted exactly once, same result as a clean run."""
    cfg = _cfg(fresh=True, limit=60, batch_size=2, seed=2)
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "blip_repro.evaluate", "--params", str(params)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    part = cfg.run_dir / "predictions.part-r0-w1.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not part.exists() or len(part.read_text().splitlines()) < 10):
        assert proc.poll() is None, "the evaluation process ended early"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_predictions(cfg.run_dir, "image_id"))
    assert 10 <= done_before < 60 and not (cfg.run_dir / "metrics.json").exists()

    import blip_repro.tasks.captioning as cap

    calls = []
    orig = cap.predict_records
    cap.predict_records = lambda *a, **k: (calls.append(len(a[2])), orig(*a, **k))[1]
    try:
        m = evaluate(cfg)
    finally:
        cap.predict_records = orig
    assert sum(calls) == 60 - done_before  # nothing recomputed
    ids = [json.loads(line)["image_id"] for line in (cfg.run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 60 and m["n_scored"] == 60
    clean = _cfg(fresh=True, limit=60, batch_size=6, seed=2, notebook="captioning-test-clean")
    evaluate(clean)
    assert (clean.run_dir / "predictions.jsonl").read_text() == (cfg.run_dir / "predictions.jsonl").read_text()


def test_folder_holding_another_run_is_refused():
    cfg = _cfg(fresh=True, limit=3)
    evaluate(cfg)
    text = (cfg.run_dir / "config.yaml").read_text()
    (cfg.run_dir / "config.yaml").write_text(text.replace("limit: 3", "limit: 4"))
    (cfg.run_dir / "metrics.json").unlink()
    with pytest.raises(UserError, match="holds another run"):
        evaluate(cfg)


def test_bad_parameters_name_the_key(tmp_path):
    with pytest.raises(UserError, match="'batch_size'.*got str"):
        runs.eval_config("captioning", model="tiny-blip", dataset="shapes", batch_size="big")
    p = tmp_path / "x.yaml"
    p.write_text("model: tiny-blip\ndataset: shapes\nnum_beam: 3\n")
    with pytest.raises(UserError, match="unknown key 'num_beam'"):
        eval_config_from_file(p, {"task": "captioning"})
    p.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        eval_config_from_file(p)


def test_missing_data_is_one_line_naming_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_REPRO_DATA", str(tmp_path / "empty"))
    cfg = runs.eval_config("captioning", model="tiny-blip", dataset="coco")
    with pytest.raises(UserError) as e:
        runs.check_ready(cfg)
    assert "blip-repro download coco" in str(e.value) and "coco_karpathy_test.json" in str(e.value)


def _copy_shapes(tmp_path, monkeypatch):
    import shutil

    src = shapes.generate()
    dst = tmp_path / "data" / "shapes"
    shutil.copytree(src, dst)
    monkeypatch.setenv("BLIP_REPRO_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BLIP_REPRO_OUTPUTS", str(tmp_path / "out"))
    models = runs.outputs_root  # trained tiny models stay where the session cache has them
    return dst, models


def test_corrupt_and_missing_images_are_named(tmp_path, monkeypatch):
    from blip_repro import tiny

    tiny.checkpoint("tiny-blip")  # train (or reuse) before outputs move
    models = runs.outputs_root() / "models"
    dst, _ = _copy_shapes(tmp_path, monkeypatch)
    (tmp_path / "out").mkdir()
    os.symlink(models, tmp_path / "out" / "models")
    bad = dst / "images/test/shapes_test_000000000002.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="corrupt image .*shapes_test_000000000002.jpg"):
        evaluate(_cfg(limit=3, batch_size=1))
    bad.unlink()
    with pytest.raises(UserError, match="missing image .*shapes_test_000000000002.jpg"):
        evaluate(_cfg(limit=3, batch_size=1))
    # the first record's prediction survived both failures (it is reused on the next run, not recomputed)
    assert 1 in read_predictions(_cfg(limit=3).run_dir, "image_id")


def test_malformed_annotation_json_is_named(tmp_path, monkeypatch):
    dst, _ = _copy_shapes(tmp_path, monkeypatch)
    (dst / "annotations/coco_karpathy_test.json").write_text("[{\"image\": ")
    with pytest.raises(UserError, match="coco_karpathy_test.json: malformed JSON"):
        evaluate(_cfg(limit=3))


def _notebook_defaults(name: str) -> dict:
    import ast

    import papermill

    nb = Path(__file__).resolve().parents[1] / "notebooks" / f"{name}.ipynb"
    return {k: ast.literal_eval(p["default"]) for k, p in papermill.inspect_notebook(str(nb)).items()}


def test_params_file_with_a_model_list_asks_for_the_notebooks_runs():
    """`python -m blip_repro.evaluate --params params/shapes/okvqa.yaml` (or under torchrun) makes the very runs that
    okvqa.ipynb makes and reuses with the same parameters: one per model, then one per LLM variant and shot count."""
    from blip_repro.tasks import okvqa_llm_table

    path = Path(__file__).resolve().parents[1] / "params/shapes/okvqa.yaml"
    p = {**_notebook_defaults("okvqa"), **yaml.safe_load(path.read_text())}
    models = p["model"].split(",")
    common = dict(dataset=p["dataset"], split=p["split"], limit=p["limit"], batch_size=p["batch_size"],
                  device=p["device"], dtype=p["dtype"], prompt=p["prompt"], length_penalty=p["length_penalty"],
                  evaluator=p["evaluator"], lemmatize=p["lemmatize"])
    notebook = [runs.eval_config("vqa", notebook="okvqa", model=m, inference=p["inference"], **common)
                for m in models]
    notebook += [c for m in models for c in okvqa_llm_table.variant_configs(
        p["llm"], p["llm_variants"], p["shots"], model=m, caption_model=p["caption_model"],
        llm_endpoint=p["llm_endpoint"], llm_cache=p["llm_cache"], llm_replay_only=p["llm_replay_only"], **common)]
    from_file = runs.eval_configs_from_file(path)
    assert len(models) == 2 and len(from_file) == 2 + 2 * 3
    assert [c.run_dir for c in from_file] == [c.run_dir for c in notebook]


def test_params_file_llm_rows_without_an_llm_asks_for_the_blip2_runs_only(tmp_path):
    p = tmp_path / "okvqa.yaml"
    p.write_text("notebook: okvqa\nmodel: tiny-blip2-opt, tiny-blip2-t5\ndataset: shapes-okvqa\nllm: ''\n"
                 "llm_variants: caption\n")
    got = runs.eval_configs_from_file(p)
    assert [(c.task, c.model, c.notebook, c.llm) for c in got] == [("vqa", "tiny-blip2-opt", "okvqa", None),
                                                                  ("vqa", "tiny-blip2-t5", "okvqa", None)]


def test_params_paths_resolve_from_the_notebooks_folder(monkeypatch):
    """Run All in Jupyter starts the kernel in notebooks/: the checkout-relative params paths still work there."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root / "notebooks")
    assert runs.load_params("params/shapes/captioning.yaml")["model"] == "tiny-blip"
    with pytest.raises(UserError, match="params file params/shapes/nope.yaml not found"):
        runs.load_params("params/shapes/nope.yaml")


def test_own_held_out_json_scores_like_the_same_split(tmp_path):
    # Your own {"image", "caption"} list (one caption per record, images repeated) goes through the captioning
    # protocol and scorer as a dataset does: written from shapes test, it gets the same captions and numbers.
    from blip_repro.data import readers
    from blip_repro.tasks import captioning

    images, _ = readers.dataset_paths("shapes")
    recs = captioning.read("shapes", "test", limit=12)
    flat = [{"image": str(Path(r["image"]).relative_to(images)), "caption": c} for r in recs for c in r["captions"]]
    held_out = tmp_path / "held_out.json"
    held_out.write_text(json.dumps(flat))
    ours = evaluate(_cfg(fresh=True, dataset="json", ann_file=str(held_out), image_root=str(images), seed=5))
    split = evaluate(_cfg(fresh=True, seed=5))
    assert ours["n_scored"] == split["n_scored"] == 12
    for k in ("bleu4", "cider", "rouge_l", "control_wrong_image_cider"):
        assert ours[k] == pytest.approx(split[k], abs=1e-9), k
    held_out.write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(UserError, match=r"held_out.json: record 0 needs a string 'image' and a 'caption'"):
        evaluate(_cfg(dataset="json", ann_file=str(held_out), image_root=str(images)))
    with pytest.raises(UserError, match="dataset json needs 'ann_file'"):
        evaluate(_cfg(dataset="json"))
