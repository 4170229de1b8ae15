"""notebooks/quickstart.ipynb runs from start to end on the CPU (nbclient), and says what it shows."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    for cell in nb.cells:  # a fresh run directory per test run
        cell.source = cell.source.replace("/tmp/v4jax-quickstart", str(tmp_path / "quickstart"))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    assert "ROMEO:" in text and "<｜User｜>" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))  # the loss plot
    diff = float(text.rsplit("max |logits difference|:", 1)[1].split()[0])
    assert diff <= 1e-5  # the safetensors round trip gives the same logits (fp32)
