"""What every committed notebook must satisfy: no outputs (executed copies live under outputs/), one `parameters`
cell that papermill can read in full (`papermill --help-notebook` lists each parameter; an unparsed line is a
parameter that `-p` can no longer override silently), and no functions defined in notebooks (they live in the
library, where tests reach them)."""
import logging
from pathlib import Path

import nbformat
import pytest
import papermill

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


def test_every_table_notebook_is_present():
    assert {"captioning", "vqav2", "gqa", "okvqa", "retrieval", "finetune"} <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_with_one_parameters_cell_and_no_definitions(name):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert not any(line.lstrip().startswith(("def ", "class ")) for c in code for line in c.source.splitlines())


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_papermill_reads_every_parameter(name, caplog):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = [line.split("=", 1)[0].strip() for line in cell.source.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    with caplog.at_level(logging.WARNING, logger="papermill"):
        found = list(papermill.inspect_notebook(str(ROOT / "notebooks" / f"{name}.ipynb")))
    assert not [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert found == assigned
