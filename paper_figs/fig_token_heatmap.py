"""Fig. 4b toy analogue (last-layer model): load-or-run (cached by config hash in paper_figs/cache/) -> plot -> PNG + PDF.

Usage: python paper_figs/fig_token_heatmap.py [--preset tiny|quick|full] [--out paper_figs/out]
"""
from _common import main

if __name__ == "__main__":
    main("token_heatmap")
