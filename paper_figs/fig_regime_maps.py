"""regime maps of DPO, IPO, R-DPO, DPOP, SimPO, RRHF: load-or-run (cached by config hash in paper_figs/cache/) -> plot -> PNG + PDF.

Usage: python paper_figs/fig_regime_maps.py [--preset tiny|quick|full] [--out paper_figs/out]
"""
from _common import main

if __name__ == "__main__":
    main("regime_maps")
