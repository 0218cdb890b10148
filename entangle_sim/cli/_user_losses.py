"""`--losses-from FILE.py`: load user losses (files that call `entangle_sim.losses.define`).

Loading a file RUNS ITS CODE, so it happens only when this flag is given. The file is loaded while
the command line is parsed (an argparse `type`), so every later step sees its losses; any error
in it becomes one line `entangle-sim: error: argument --losses-from: FILE: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback
from pathlib import Path

HELP = ("Python file defining losses with entangle_sim.losses.define (repeatable). "
        "WARNING: the file's code is executed.")


def add_flag(parser) -> None:
    parser.add_argument("--losses-from", action="append", default=[], metavar="FILE.py", type=load_file,
                        help=HELP)


def _line_of(exc: BaseException, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return f" (line {frames[-1].lineno})" if frames else ""


def load_file(path: str) -> list[str]:
    """Run `path` as a module; returns the names of the losses it defined (new or redefined)."""
    from ..losses import user as user_losses

    p = Path(path).expanduser()
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such file" if not p.exists() else f"{path}: not a file")
    p = p.resolve()
    start = len(user_losses.DEFINED)
    mod_name = f"entangle_sim_user_losses_{abs(hash(str(p)))}"
    try:
        spec = importlib.util.spec_from_file_location(mod_name, p)
        if spec is None or spec.loader is None:
            raise argparse.ArgumentTypeError(f"{path}: cannot be loaded as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling inside the file need it
        spec.loader.exec_module(module)
    except argparse.ArgumentTypeError:
        sys.modules.pop(mod_name, None)
        raise
    except SyntaxError as e:
        sys.modules.pop(mod_name, None)
        raise argparse.ArgumentTypeError(f"{path}: syntax error at line {e.lineno}: {e.msg}") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code may raise anything
        sys.modules.pop(mod_name, None)
        msg = str(e).splitlines()[0] if str(e) else ""
        kind = "" if type(e).__name__ == "LossDefinitionError" else f"{type(e).__name__}: "
        raise argparse.ArgumentTypeError(f"{path}{_line_of(e, p)}: {kind}{msg}") from None
    new = list(dict.fromkeys(user_losses.DEFINED[start:]))
    if not new:
        raise argparse.ArgumentTypeError(f"{path}: defines no loss (call entangle_sim.losses.define)")
    return new
