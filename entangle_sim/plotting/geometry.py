"""Figures for the gradient-geometry benchmarks. Functions return a Figure; no file I/O."""
from __future__ import annotations

import numpy as np

from .style import new_axes


def plot_roofline(rows, peak_gflops: float, bandwidth_gbs: float, *, ax=None):
    """Measured throughput vs the machine roofline min(peak, bandwidth x intensity).

    rows: dicts with 'row' (path name), 'width', 'flops', 'seconds', 'xla_bytes_accessed' (as written by
    benchmarks/bench_geometry_scale.py --roofline); x = arithmetic intensity flops / bytes accessed
    (FLOP/byte), y = achieved GFLOP/s. Points are labelled by model width.
    """
    fig, ax = new_axes(ax, figsize=(6.4, 4.2))
    ok = [r for r in rows if "seconds" in r and r.get("xla_bytes_accessed")]
    inten = np.array([r["flops"] / r["xla_bytes_accessed"] for r in ok] or [1.0])
    x = np.logspace(np.log10(max(inten.min() / 4, 1e-2)), np.log10(inten.max() * 4), 200)
    ax.plot(x, np.minimum(peak_gflops, bandwidth_gbs * x), color="k", lw=1.2,
            label=f"roofline: {peak_gflops:.0f} GFLOP/s, {bandwidth_gbs:.0f} GB/s")
    for name in dict.fromkeys(r["row"] for r in ok):
        pts = [r for r in ok if r["row"] == name]
        xi = [r["flops"] / r["xla_bytes_accessed"] for r in pts]
        yi = [r["flops"] / r["seconds"] / 1e9 for r in pts]
        line, = ax.plot(xi, yi, "o-", ms=4, label=name)
        for r, a, b in zip(pts, xi, yi):
            ax.annotate(str(r["width"]), (a, b), fontsize=6, xytext=(2, 2), textcoords="offset points",
                        color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte accessed, XLA)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title("geometry paths vs machine roofline (labels: model width)")
    ax.legend(fontsize=7)
    return fig
