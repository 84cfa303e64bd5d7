"""notebooks/vqav2, gqa and okvqa executed headlessly on the shapes params (README command 1), and a paper model
stopping early offline with one line, exactly as `papermill notebooks/okvqa.ipynb out.ipynb -p model flant5xl`."""
import json
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

from blip_repro.runs import outputs_root

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("vqav2", "gqa", "okvqa")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_shapes_run_beats_the_majority_control(name, tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_REPRO_FIGURES", str(tmp_path / "figures"))
    params = yaml.safe_load((ROOT / "params" / "shapes" / f"{name}.yaml").read_text())
    papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters=params, kernel_name="python3", cwd=str(ROOT), progress_bar=False)
    summary = json.loads((outputs_root() / name / "summary.json").read_text())
    assert summary["suite"] == "shapes"
    models = params["model"].split(",")
    assert sorted(summary["metrics"]) == sorted(models)
    metric = "gqa_acc" if name == "gqa" else "vqa_acc"
    for model, m in summary["metrics"].items():
        assert m["n_scored"] == m["n_questions"] > 100  # every question scored, and counted
        assert m["control_majority_acc"] is not None and m["per_question_type"]
        if name == "okvqa":  # needs facts the tiny models never saw: near the control, lemmatized, recorded
            assert m["lemmatize"] is True and "en_core_web_sm" in m["lemmatizer"]
        else:
            assert m[metric] > m["control_majority_acc"], (model, m[metric], m["control_majority_acc"])
    if name == "okvqa":
        # no pass mark for BLIP-2 alone (the tiny models cannot know the facts asked for): the only checks are the
        # LLM section's, which the combined report shows
        assert summary["checks"] == summary.get("llm_checks", [])
    else:
        assert summary["checks"] and all(c["passed"] for c in summary["checks"]), summary["checks"]
    if name == "vqav2":
        assert {r["model"] for r in summary["per_answer"]} >= set(models)
        assert all(summary["metrics"][m]["vqa_acc"] >= 50 for m in ("tiny-blip2-opt", "tiny-blip2-t5"))
    if name == "gqa":
        assert all(m["rule"] == "lavis2023feb" for m in summary["metrics"].values())
    rows = {(r["model"], r["metric"]) for r in summary["rows"]}
    assert {(m, metric) for m in models} | {(m, "control_majority_acc") for m in models} <= rows
    for ext in ("png", "svg", "pdf"):
        assert (tmp_path / "figures" / f"{name}_shapes.{ext}").stat().st_size > 1000


@pytest.mark.parametrize("name, model, missing", [
    ("okvqa", "flant5xl", "OpenEnded_mscoco_val2014_questions.json"),
    ("vqav2", "blip-base-vqa", "v2_OpenEnded_mscoco_val2014_questions.json"),
    ("gqa", "opt2.7b", "testdev_balanced_questions.json")])
def test_paper_model_offline_stops_early_with_one_line(name, model, missing, tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as e:
        papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"model": model}, kernel_name="python3", cwd=str(ROOT),
                                   progress_bar=False)
    assert e.value.ename == "UserError" and "\n" not in e.value.evalue
    assert "not in the local HF cache" in e.value.evalue and f"blip-repro zoo --fetch {model}" in e.value.evalue
    assert missing in e.value.evalue and f"blip-repro download {name}" in e.value.evalue
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    failed = [i for i, c in enumerate(c for c in out.cells if c.cell_type == "code")
              if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert failed and failed[0] <= 2  # the parameters, the injected parameters, then the readiness check
