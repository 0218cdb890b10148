"""Fig. 4b analogue (tiny transformer): load-or-run (cached by config hash in paper_figs/cache/) -> plot -> PNG + PDF.

Usage: python paper_figs/fig_transformer_heatmap.py [--preset tiny|quick|full] [--out paper_figs/out]
"""
from _common import main

if __name__ == "__main__":
    main("transformer_heatmap")
