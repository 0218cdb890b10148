"""Every notebook (jupytext percent .py) executes headless on the tiny presets (ENTANGLE_SIM_TINY=1)."""
import os
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.py"))


def test_notebooks_are_py_only():
    assert NOTEBOOKS, "no notebooks found"
    assert not list(NB_DIR.glob("*.ipynb")), "commit only the jupytext .py files"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch, tmp_path):
    # A notebook may declare optional extras in a header line "# requires: torch, transformers".
    for line in path.read_text().splitlines()[:30]:
        if line.startswith("# requires:"):
            for mod in line.split(":", 1)[1].split(","):
                pytest.importorskip(mod.strip())
    monkeypatch.setenv("ENTANGLE_SIM_TINY", "1")
    monkeypatch.setenv("ENTANGLE_SIM_CACHE", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = jupytext.read(path)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
