"""regime maps of every registered loss: load-or-run (cached by config hash in paper_figs/cache/) -> plot -> PNG + PDF.

Usage: python paper_figs/fig_regime_maps_all.py [--preset tiny|quick|full] [--out paper_figs/out]
"""
from _common import main

if __name__ == "__main__":
    main("regime_maps_all")
