"""The paper's transformer claims as statistics (tiny transformer, seeds x settings): load-or-run (cached by
config hash in paper_figs/cache/) -> plot -> PNG + PDF.

Usage: python paper_figs/fig_transformer_claims.py [--preset tiny|quick|full] [--out paper_figs/out]
"""
from _common import main

if __name__ == "__main__":
    main("transformer_claims")
