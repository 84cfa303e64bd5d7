"""notebooks/captioning.ipynb executed headlessly, as README command 1 and a GPU user run it."""
import json
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

from blip_repro.runs import outputs_root

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks" / "captioning.ipynb"


def test_shapes_run_reaches_the_measured_quality(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_REPRO_FIGURES", str(tmp_path / "figures"))
    params = yaml.safe_load((ROOT / "params/shapes/captioning.yaml").read_text())
    papermill.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), parameters=params, kernel_name="python3",
                               cwd=str(ROOT), progress_bar=False)
    summary = json.loads((outputs_root() / "captioning" / "summary.json").read_text())
    assert summary["suite"] == "shapes"
    checks = {c["metric"]: c for c in summary["checks"]}
    # shapes.md: trained tiny BLIP 3.3-4.0, untrained 0.1, blind captions 0.7-1.0
    assert checks["cider"]["passed"], checks["cider"]
    assert checks["cider_minus_control"]["passed"], checks["cider_minus_control"]
    assert summary["metrics"]["n_scored"] == 200 and summary["metrics"]["spice"] is None
    for ext in ("png", "svg", "pdf"):
        assert (tmp_path / "figures" / f"captioning_shapes.{ext}").stat().st_size > 1000
    row = next(r for r in summary["rows"] if r["metric"] == "spice")
    assert "CoreNLP" in row["note"]  # SPICE is reported as unavailable, never made up


def test_paper_model_offline_stops_early_with_one_line(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as e:
        papermill.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), parameters={"model": "blip-base-caption"},
                                   kernel_name="python3", cwd=str(ROOT), progress_bar=False)
    assert e.value.ename == "UserError"
    assert "not in the local HF cache" in e.value.evalue and "coco_karpathy_test.json" in e.value.evalue
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    failed = [i for i, c in enumerate(c for c in out.cells if c.cell_type == "code")
              if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert failed and failed[0] <= 2  # the parameters, the injected parameters, then the readiness check
