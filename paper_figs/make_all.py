"""Every figure, the condition table and the verification report (same as `entangle-sim reproduce`).

Usage: python paper_figs/make_all.py [--quick] [--out paper_figs/out]
"""
import sys

from entangle_sim.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
