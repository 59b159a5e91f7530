"""Notebooks as a person opens them: stored without outputs, opening with objectives and prerequisites."""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_with_outputs_stripped(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, (
                f"{path.name} cell {i} has outputs: run `jupyter nbconvert --clear-output --inplace {path.name}` "
                "or install the nbstripout filter (notebooks/README.md)")
    assert "widgets" not in nb.get("metadata", {}), f"{path.name} stores widget state; strip it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_opens_with_objectives_and_prerequisites(path):
    cells = json.loads(path.read_text())["cells"]
    assert "".join(cells[0]["source"]).startswith("# "), path.name
    intro = "".join(cells[1]["source"])
    assert intro.startswith("**Learning objectives.**") and "**Prerequisites:**" in intro, path.name
    assert 3 <= len(re.findall(r"^\d\. ", intro, flags=re.M)) <= 5, path.name
