"""`entangle-sim` command line.

Each sub-command lives in its own module exposing `register(subparsers)`, which adds a parser and
sets `func=run` with `run(args) -> int`. Bad input raises `CLIError` (or ValueError from the
library); `main` prints one line naming the problem and exits with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order they appear in --help.
_COMMANDS = (
    "losses_cmd",     # losses, conditions, predict
    "simulate_cmd",   # simulate
    "diagnose_cmd",   # diagnose
    "mitigate_cmd",   # mitigate
    "analyze_log_cmd",  # analyze-log
    "reproduce_cmd",  # reproduce
    "diagnose_model_cmd",  # diagnose-model (PyTorch extra)
)


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints usage + message; keep it to one line
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="entangle-sim", description="Gradient entanglement in margin-based "
                     "preference optimization: conditions, predictions, simulations, reports.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod_name in _COMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{mod_name}")
        except ModuleNotFoundError as e:  # a command still being built must not break the others
            if e.name == f"{__name__}.{mod_name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except (CLIError, ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"entangle-sim: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `entangle-sim losses | head`
        sys.stderr = None
        return 0
    except KeyboardInterrupt:
        print("entangle-sim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
