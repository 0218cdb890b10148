"""Write the per-loss condition table (from the symbolic engine) into docs/theory.md.

Usage: python docs/gen_theory_table.py [--check]   (--check: exit 1 if the file is stale)
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

BEGIN, END = "<!-- BEGIN GENERATED CONDITION TABLE -->", "<!-- END GENERATED CONDITION TABLE -->"
PAGE = Path(__file__).resolve().parent / "theory.md"


def render(text: str) -> str:
    from entangle_sim import losses  # noqa: F401 - loads the registry the table lists
    from entangle_sim.symbolic.present import table

    block = f"{BEGIN}\n{table('markdown')}\n{END}"
    return re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)


def main(argv) -> int:
    old = PAGE.read_text()
    new = render(old)
    if "--check" in argv:
        if new != old:
            print("docs/theory.md is stale: run python docs/gen_theory_table.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
