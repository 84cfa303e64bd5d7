"""notebooks/finetune.ipynb executed headlessly on the shapes params (README command 1): fine-tune tiny-blip on a
JSON list written from shapes, draw the loss curve, evaluate the fine-tuned model through blip_repro.evaluate."""
import json
from pathlib import Path

import papermill
import yaml

from blip_repro.runs import outputs_root

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks" / "finetune.ipynb"


def test_shapes_run_fine_tunes_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_REPRO_FIGURES", str(tmp_path / "figures"))
    params = yaml.safe_load((ROOT / "params/shapes/finetune.yaml").read_text())
    params["output_dir"] = str(tmp_path / "run")  # a fresh run, not one cached by an earlier session
    papermill.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), parameters=params, kernel_name="python3",
                               cwd=str(ROOT), progress_bar=False)
    summary = json.loads((outputs_root() / "finetune" / "summary.json").read_text())
    assert summary["suite"] == "shapes" and summary["train"]["steps"] == 200
    assert summary["train"]["model"] == str(tmp_path / "run" / "model")
    assert summary["metrics"]["n_scored"] == 100
    for check in summary["checks"]:
        assert check["passed"], check
    for ext in ("png", "svg", "pdf"):
        assert (tmp_path / "figures" / f"finetune_shapes.{ext}").stat().st_size > 1000
    assert {r["metric"] for r in summary["rows"]} == {"bleu4", "cider", "control_wrong_image_cider"}
