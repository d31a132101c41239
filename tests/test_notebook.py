"""The Colab notebook runs top to bottom (here on CPU, with small settings in place of its
parameters cell, as papermill would inject them), so it cannot rot."""

import json

import pytest
from conftest import REPO, TINY_TEXT

NOTEBOOK = REPO / "notebooks" / "colab.ipynb"


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    (where,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    data = tmp_path / "tiny.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    small = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "8",
             "--max-iters", "12", "--eval-interval", "6", "--eval-iters", "2", "--device", "cpu", "--threads", "1"]
    nb.cells.insert(where + 1, nbformat.v4.new_code_cell(
        f"INSTALL = False\nDATA = {str(data)!r}\nFLAGS = {small!r}\nOUT = {str(tmp_path / 'run')!r}\n"
        "PROMPT = \"All:\"\nSAMPLE_CHARS = 40\nSERVE = True"))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    def text(cell) -> str:
        return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")

    out = "\n".join(text(c) for c in nb.cells if c.cell_type == "code")
    assert "--dtype auto -> " in out and "no GPU: this runs on the CPU" in out
    assert "12 steps take about" in out  # the estimate is for the run FLAGS describe, not the probe's 10 steps
    assert "step 12: train loss" in out and "val loss over the whole val split" in out
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))  # the plot
    assert "All:" in out
    assert "not in Colab: the playground is not started here" in out
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["step"] == 12 and "final_val_loss" in final
