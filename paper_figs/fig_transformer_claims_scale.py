"""The paper's transformer claims as the model grows (tiny-transformer sizes, seeds x sizes): load-or-run
(cached by config hash in paper_figs/cache/) -> plot -> PNG + PDF. The preset's sizes (full: the two
smallest of `entangle-sim claims --preset scale`, which adds 4 layers x 128 and writes the same figure).

Usage: python paper_figs/fig_transformer_claims_scale.py [--preset tiny|quick|full] [--out paper_figs/out]
"""
from _common import main

if __name__ == "__main__":
    main("transformer_claims_scale")
