"""notebooks/quickstart.ipynb runs from start to end on the CPU (nbclient), and shows what it says.

The notebook runs in a child process, as a user would run it: on one CPU device (the test workers'
8 fake devices would spread its training over 8), and with nbclient's kernel machinery (zmq,
tornado) kept out of the test workers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import sys
import nbformat
from nbclient import NotebookClient

src, out, work, root = sys.argv[1:]
nb = nbformat.read(src, as_version=4)
for cell in nb.cells:  # a fresh run directory per test run
    cell.source = cell.source.replace("/tmp/v4jax-quickstart", work)
NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": root}}).execute()
nbformat.write(nb, out)
"""


def test_quickstart_notebook_runs(tmp_path):
    out = tmp_path / "executed.ipynb"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-c", RUN, str(ROOT / "notebooks" / "quickstart.ipynb"), str(out),
                    str(tmp_path / "quickstart"), str(ROOT)], check=True, timeout=900, env=env)
    cells = [c for c in json.loads(out.read_text())["cells"] if c["cell_type"] == "code"]
    outputs = [o for c in cells for o in c.get("outputs", [])]
    text = "\n".join("".join(o.get("text", "")) for o in outputs if o.get("output_type") == "stream")
    assert "ROMEO:" in text and "<｜User｜>" in text
    assert "os.fork()" not in text  # no command line forks the kernel once JAX runs in it
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot
    diff = float(text.rsplit("max |logits difference|:", 1)[1].split()[0])
    assert diff <= 1e-5  # the safetensors round trip gives the same logits (fp32)
