"""benchmarks/gpu_check.sh --tiny runs the geometry benchmarks end to end (tiny size, CPU) and writes a
complete table; the roofline figure function returns a Figure."""
import json
import os
import subprocess
import sys

import matplotlib

from entangle_sim.plotting.geometry import plot_roofline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_tiny(tmp_path):
    env = os.environ | {"PYTHON": sys.executable, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu",
                        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--tiny"], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "geometry_scale_tiny.json").read_text())
    rows = {x["row"]: x for x in res["rows"]}
    assert set(rows) == {"seq/loop", "seq/vmap", "seq/layerwise", "seq/layerwise@2", "token/loop",
                         "token/jacrev", "token/factored"}
    for x in rows.values():
        assert x["seconds"] > 0 and x["vmhwm_bytes"] > 0 and 0 < x["fraction_of_peak"]
        assert "speedup_vs_loop" in x
    assert "| seq/layerwise |" in r.stdout and "matmul peak" in r.stdout


def test_plot_roofline():
    rows = [{"row": "seq/layerwise", "width": w, "flops": 1e9 * w, "seconds": 0.1, "xla_bytes_accessed": 1e7 * w ** 0.5}
            for w in (64, 128)] + [{"row": "seq/vmap", "error": "x"}]
    fig = plot_roofline(rows, 80.0, 20.0)
    assert isinstance(fig, matplotlib.figure.Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.lines) == 2
