"""notebooks/retrieval.ipynb executed headlessly: the shapes run (README command 1) with the trained tiny-blip-itm,
and a paper model offline stopping in one line."""
import json
from pathlib import Path

import papermill
import pytest
import yaml

from blip_repro.runs import outputs_root

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks" / "retrieval.ipynb"


def test_every_paper_params_file_names_a_zoo_retrieval_model_with_a_paper_row():
    from blip_repro import report, zoo

    seen = set()
    for f in sorted((ROOT / "params" / "retrieval").glob("*.yaml")):
        p = yaml.safe_load(f.read_text())
        spec = zoo.get_spec(p["model"])
        assert spec.task == "retrieval" and p["dataset"] in ("coco", "flickr30k"), f
        rows = [r for r in spec.paper_rows if ("retrieval", r, p["dataset"]) in report.PAPER]
        assert rows or p["model"] == "itm-vit-g", f  # BLIP-2 prints no number for the pre-trained model
        seen.add((p["model"], p["dataset"]))
    # Table 6 (zero-shot Flickr30k) is the COCO model on Flickr30k, not the Flickr model
    assert {("blip-base-itm-coco", "flickr30k"), ("itm-vit-g-coco", "flickr30k"), ("blip-large-itm-flickr",
                                                                                    "flickr30k")} <= seen
    zs = report.rows_for("retrieval", [{"config": {"model": "blip-base-itm-coco", "dataset": "flickr30k",
                                                   "split": "test"}, "metrics": {}}], ["tr_r1"])
    assert zs[0]["paper"] == 96.0  # BLIP Table 6, not Table 5's fine-tuned 97.3


def test_shapes_run_scores_far_above_chance(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_REPRO_FIGURES", str(tmp_path / "figures"))
    params = yaml.safe_load((ROOT / "params/shapes/retrieval.yaml").read_text())
    papermill.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), parameters=params, kernel_name="python3",
                               cwd=str(ROOT), progress_bar=False)
    summary = json.loads((outputs_root() / "retrieval" / "summary.json").read_text())
    m = summary["metrics"]
    assert summary["suite"] == "shapes" and all(c["passed"] for c in summary["checks"]), summary["checks"]
    assert m["n_images"] == 200 and m["n_texts"] == 1000 and m["k_test"] == 32
    assert m["r_mean"] > 10 * m["chance_r_mean"]
    assert {r["metric"] for r in summary["rows"]} == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10",
                                                      "r_mean"}
    for ext in ("png", "svg", "pdf"):
        assert (tmp_path / "figures" / f"retrieval_shapes.{ext}").stat().st_size > 1000


def test_paper_model_offline_stops_early_with_one_line(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as e:
        papermill.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), kernel_name="python3", cwd=str(ROOT),
                                   parameters={"model": "blip-base-itm-coco", "dataset": "flickr30k"},
                                   progress_bar=False)
    assert e.value.ename == "UserError"
    assert "not in the local HF cache" in e.value.evalue and "flickr30k_test.json" in e.value.evalue
