"""Plotting: `plot_*(data, *, ax=None) -> Figure`, Axes API only, no file I/O.

Modules by topic share the style of `style.py` (Okabe-Ito colourblind-safe palette).
"""
from .style import COLORS, REGIME_COLORS, apply_style, new_axes  # noqa: F401
