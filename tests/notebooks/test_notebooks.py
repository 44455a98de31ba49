"""Both notebooks execute from top to bottom (nbclient, kernel python3) and show their tables and plots."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
EXPECTED_TEXT = {
    "quickstart.ipynb": ["QuantizedCache 2-bit", "SinkCache 4+124", "bytes held"],
    "perplexity_and_memory.ipynb": ["quantized:bits=2", "h2o:budget=256", "of the bytes for", "890-1016"],
}


def test_every_notebook_is_tested():
    assert {path.name for path in NOTEBOOKS.glob("*.ipynb")} == set(EXPECTED_TEXT)


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(EXPECTED_TEXT))
def test_notebook_executes(name, real_model, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in notebook.cells:  # the committed outputs must not count
        if cell.cell_type == "code":
            cell.outputs = []
    # Raises CellExecutionError (with the cell's traceback) if any cell fails.
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs for cell in code_cells), "every code cell shows something"
    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") + output.get("data", {}).get("text/plain", "") for output in outputs)
    for expected in EXPECTED_TEXT[name]:
        assert expected in text, expected
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert images, "the notebook draws at least one plot"
