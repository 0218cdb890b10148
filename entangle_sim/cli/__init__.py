"""`entangle-sim` command line.

Each sub-command lives in its own module exposing `register(subparsers)`, which adds a parser and
sets `func=run` with `run(args) -> int`. `main` is the one error boundary:

* bad input (`CLIError`, or ValueError / KeyError / FileNotFoundError / OverflowError from the
  library's validation) -> one line `entangle-sim: error: ...`, exit status 2;
* a run whose result holds NaN/inf (`NonFiniteResult`) -> one line, exit status 1;
* any other exception (a bug) -> one line saying so and how to see the traceback (`--debug` or
  ENTANGLE_SIM_DEBUG=1), exit status 1. With `--debug` exceptions propagate unchanged.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Sub-command modules, in the order they appear in --help.
_COMMANDS = (
    "losses_cmd",     # losses, conditions, predict
    "simulate_cmd",   # simulate
    "diagnose_cmd",   # diagnose
    "claims_cmd",     # claims
    "mitigate_cmd",   # mitigate
    "analyze_log_cmd",  # analyze-log
    "reproduce_cmd",  # reproduce
    "diagnose_model_cmd",  # diagnose-model (PyTorch extra)
    "predict_group_cmd",  # predict-group
    "diagnose_rollouts_cmd",  # diagnose-rollouts (PyTorch extra)
)


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class NonFiniteResult(Exception):
    """A computation produced NaN/inf: printed as one line, exit status 1."""


_BAD_INPUT = (CLIError, ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
              PermissionError, OverflowError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints usage + message; keep it to one line
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="entangle-sim", description="Gradient entanglement in margin-based "
                     "preference optimization: conditions, predictions, simulations, reports.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected error (also: ENTANGLE_SIM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod_name in _COMMANDS:   # every command module ships with the package
        importlib.import_module(f"{__name__}.{mod_name}").register(sub)
    return parser


def _debug_requested(argv) -> bool:
    argv = sys.argv[1:] if argv is None else list(argv)
    return "--debug" in argv or os.environ.get("ENTANGLE_SIM_DEBUG", "") not in ("", "0")


def _one_line(e) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    if isinstance(e, OSError) and e.filename is not None:
        msg = f"{e.strerror or e}: {e.filename}"
    text = " ".join(str(msg).split())  # one line, whatever the message holds
    return text or type(e).__name__


def main(argv=None) -> int:
    debug = _debug_requested(argv)
    argv = [a for a in (sys.argv[1:] if argv is None else list(argv)) if a != "--debug"]  # allowed anywhere
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `entangle-sim losses | head`
        sys.stderr = None
        return 0
    except KeyboardInterrupt:
        print("entangle-sim: interrupted", file=sys.stderr)
        return 130
    except NonFiniteResult as e:
        if debug:
            raise
        print(f"entangle-sim: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except _BAD_INPUT as e:
        if debug and not isinstance(e, CLIError):
            raise
        print(f"entangle-sim: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except RecursionError:
        if debug:
            raise
        print("entangle-sim: error: input nested too deeply", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the one boundary for unexpected errors
        if debug:
            raise
        print(f"entangle-sim: internal error: {type(e).__name__}: {_one_line(e)} (this is a bug; rerun with "
              "--debug or ENTANGLE_SIM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
