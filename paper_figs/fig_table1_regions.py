"""Table 1: region map over (rho_w, rho_l): load-or-run (cached by config hash in paper_figs/cache/) -> plot -> PNG + PDF.

Usage: python paper_figs/fig_table1_regions.py [--preset tiny|quick|full] [--out paper_figs/out]
"""
from _common import main

if __name__ == "__main__":
    main("table1_regions")
