"""`blip-repro reproduce`: which experiments a suite runs, the combined report, and a failing notebook (the others
still run, the report says which failed and why, the command exits non-zero)."""
import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from blip_repro import cli, reproduce, runs
from blip_repro.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _outputs(tmp_path, monkeypatch) -> Path:
    """A fresh outputs folder (so this run is really executed) that shares the session's trained tiny models."""
    models = runs.outputs_root() / "models"
    models.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "models").symlink_to(models, target_is_directory=True)
    monkeypatch.setenv("BLIP_REPRO_OUTPUTS", str(out))
    monkeypatch.setenv("BLIP_REPRO_FIGURES", str(tmp_path / "figures"))
    return out


@pytest.mark.slow
def test_reproduce_shapes_captioning_writes_the_report_with_its_table(tmp_path, monkeypatch):
    out = _outputs(tmp_path, monkeypatch)
    monkeypatch.chdir(ROOT)
    assert cli.main(["reproduce", "--suite", "shapes", "--only", "captioning"]) == 0
    text = (out / "report_shapes.md").read_text()
    assert "| captioning | params/shapes/captioning.yaml | ok | [captioning_shapes.ipynb]" in text
    section = text.split("## captioning", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"\| tiny-blip \| shapes \| cider \| \d+(\.\d+)? \|", section), section
    assert "| model | dataset | metric | ours | paper | Δ |" in section
    assert re.search(r"Checks on the built-in benchmark: (\d+) of \1 passed", section), section
    links = re.findall(r"\]\(([^)]+)\)", text)  # executed notebook and figures, relative to the report
    assert any(link.endswith("captioning_shapes.png") for link in links)
    assert all((out / link).resolve().exists() for link in links), links
    summary = json.loads((out / "notebooks" / "captioning_shapes.summary.json").read_text())
    assert summary["suite"] == "shapes" and summary["rows"]


def _notebook(path: Path, params: str, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


OK_BODY = """from blip_repro import report
rows = [{"model": "m", "dataset": "shapes", "split": "test", "metric": "acc", "ours": value, "paper": None,
         "delta": None, "tolerance": None, "status": "", "n": 4, "note": ""}]
checks = [{"check": "acc >= 0.5", "metric": "acc", "value": value, "minimum": 0.5, "passed": value >= 0.5}]
tables = [{"id": "more", "title": "A second table", "columns": ["model", "gain"], "rows": [{"model": "m", "gain": value}],
           "note": "said under it"}]
report.write_summary("ok", suite, rows, [], {"checks": checks, "tables": tables})"""


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout with a notebook that works, one that raises, and one without params (never run)."""
    co = tmp_path / "checkout"
    _notebook(co / "notebooks" / "ok.ipynb", 'suite = "paper"\nvalue = 0.0', OK_BODY)
    _notebook(co / "notebooks" / "broken.ipynb", 'suite = "paper"', 'raise ValueError("broken on purpose")')
    _notebook(co / "notebooks" / "nop.ipynb", 'suite = "paper"', "")
    for rel, params in {"shapes/ok.yaml": {"suite": "shapes", "value": 0.75}, "shapes/broken.yaml": {"suite": "shapes"},
                        "ok/first.yaml": {"value": 0.25}, "ok/second.yaml": {"value": 0.5}}.items():
        (co / "params" / rel).parent.mkdir(parents=True, exist_ok=True)
        (co / "params" / rel).write_text(yaml.safe_dump(params))
    monkeypatch.chdir(co)
    return co


def test_suites_discover_their_experiments(checkout):
    assert [e.stem for e in reproduce.experiments("shapes")] == ["broken_shapes", "ok_shapes"]
    assert [e.stem for e in reproduce.experiments("paper")] == ["ok_paper_first", "ok_paper_second"]
    assert reproduce.experiments("paper")[0].parameters() == {"value": 0.25}
    # finetune's params files are training recipes, handed to the notebook's `recipe` parameter
    _notebook(checkout / "notebooks" / "finetune.ipynb", 'recipe = ""\nsuite = "paper"', "")
    for name in ("coco_caption_blip", "own_json"):  # own_json: the template for your own data, not a paper run
        (checkout / "params" / "finetune" / f"{name}.yaml").parent.mkdir(exist_ok=True)
        (checkout / "params" / "finetune" / f"{name}.yaml").write_text("task: captioning\n")
    fine = [e for e in reproduce.experiments("paper") if e.name == "finetune"]
    assert [e.stem for e in fine] == ["finetune_paper_coco_caption_blip"]
    assert fine[0].parameters() == {"recipe": "params/finetune/coco_caption_blip.yaml", "suite": "paper"}
    assert [e.params.name for e in reproduce.experiments("shapes", only=["ok"])] == ["ok.yaml"]
    with pytest.raises(UserError, match="--only nop: no such notebook with shapes params; valid: broken, ok"):
        reproduce.experiments("shapes", only=["nop"])


@pytest.mark.slow
def test_a_failing_notebook_is_reported_and_the_others_still_run(checkout, tmp_path, monkeypatch, capsys):
    out = _outputs(tmp_path, monkeypatch)
    assert cli.main(["reproduce", "--suite", "shapes"]) == 2
    err = capsys.readouterr().err
    assert "error: 1 of 2 notebooks failed (broken_shapes); report: " in err
    text = (out / "report_shapes.md").read_text()
    assert "| broken | params/shapes/broken.yaml | failed: ValueError: broken on purpose |" in text
    assert "| ok | params/shapes/ok.yaml | ok | [ok_shapes.ipynb](notebooks/ok_shapes.ipynb) |" in text
    assert "| m | shapes | acc | 0.75 |" in text and "1 of 1 passed" in text
    assert "### A second table\n\n| model | gain |\n|---|---|\n| m | 0.75 |\n\nsaid under it" in text  # okvqa's LLM rows
    assert "nop" not in text
    assert reproduce.notebook_status(out / "notebooks" / "broken_shapes.ipynb")[0] == "failed"
    # `blip-repro report` rewrites the same page from the executed notebooks alone
    (out / "report_shapes.md").unlink()
    assert cli.main(["report", "--suite", "shapes"]) == 0
    assert (out / "report_shapes.md").read_text().split("\n", 3)[3] == text.split("\n", 3)[3]
