"""Input checks shared by the sub-commands: range-checked argparse types, output folders validated
before any work, run-size estimates refused before any work, strict JSON output.

Run-size estimates are deliberately rough upper bounds from the configuration alone (bytes of the
records a command keeps in memory and writes, and a count of per-pair gradient evaluations); a
command refuses when an estimate exceeds the limit below, naming the flag and the estimate, unless
`--allow-large` is given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from ..validate import SEED_MAX

#: Refuse (without --allow-large) above these estimates: a quarter of a 24 GiB machine, and about
#: an hour of CPU at ~1e7 per-pair gradient evaluations a second (measured order of magnitude).
MEMORY_LIMIT = 6 * 2**30
WORK_LIMIT = 3e10


def int_in(lo: int, hi: int):
    """argparse type: an integer in [lo, hi] (refused at parse time, one line)."""
    def parse(text: str) -> int:
        try:
            x = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if x < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        if x > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {text}")
        return x
    parse.__name__ = "integer"
    return parse


def real_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """argparse type: a finite real in [lo, hi] (or (lo, hi] with lo_open); NaN/inf refused."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if lo is not None and (x < lo or (lo_open and x == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, got {text}")
        if hi is not None and x > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:g}, got {text}")
        return x
    parse.__name__ = "number"
    return parse


SEED = int_in(0, SEED_MAX)
STEPS = int_in(1, 10**9)  # the estimate below decides what is feasible; this only bounds parsing
COUNT = int_in(1, 10**9)


def add_allow_large(p) -> None:
    p.add_argument("--allow-large", action="store_true",
                   help=f"run even if the estimated memory (> {MEMORY_LIMIT / 2**30:g} GiB) or work "
                        f"(> {WORK_LIMIT:.0e} per-pair gradient evaluations) exceeds the limits")


def check_size(args, *, memory_bytes: float, work: float, flags: str) -> None:
    """Refuse an absurd run before doing it (CLIError naming the flags and the estimates)."""
    from . import CLIError

    if getattr(args, "allow_large", False):
        return
    if memory_bytes > MEMORY_LIMIT:
        raise CLIError(f"{flags}: estimated memory {memory_bytes / 2**30:.3g} GiB exceeds the "
                       f"{MEMORY_LIMIT / 2**30:g} GiB limit; reduce them or pass --allow-large")
    if work > WORK_LIMIT:
        raise CLIError(f"{flags}: estimated work {work:.3g} per-pair gradient evaluations exceeds the "
                       f"{WORK_LIMIT:.0e} limit; reduce them or pass --allow-large")


def check_out_dir(path, flag: str = "--out", *, create: bool = True) -> Path:
    """Validate an output folder BEFORE any computation: refuse '', an existing file, a path under a
    file and a folder that cannot be written; create it (with parents). Returns the Path."""
    from . import CLIError

    if path is None:
        raise CLIError(f"{flag} needs a folder")
    text = str(path)
    if not text.strip():
        raise CLIError(f"{flag} must not be empty")
    p = Path(text).expanduser()
    if p.exists() and not p.is_dir():
        raise CLIError(f"{flag} {text!r} exists and is not a directory")
    for parent in p.parents:  # the nearest existing ancestor must be a writable folder
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{flag} {text!r}: {str(parent)!r} is a file, not a directory")
            break
    if not create:
        return p
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".write-test-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(f"{flag} {text!r} cannot be written: {e.strerror or e}") from None
    return p


def _nonfinite_paths(obj, path="$"):
    if isinstance(obj, float):
        if not math.isfinite(obj):
            yield path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nonfinite_paths(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _nonfinite_paths(v, f"{path}[{i}]")


def require_finite(summary, what: str = "result", keys=None) -> None:
    """Exit non-zero (NonFiniteResult, exit 1) if the result (or its entries `keys`, the values a
    finite run always has; other entries may be NaN meaning "not applicable") holds NaN or inf."""
    from . import NonFiniteResult

    part = summary if keys is None else {k: summary.get(k) for k in keys}
    bad = list(_nonfinite_paths(part))
    if bad:
        raise NonFiniteResult(f"the {what} holds non-finite values ({len(bad)}, e.g. {bad[0]}); "
                              "the run diverged or its inputs are degenerate")


def dumps(obj, **kw) -> str:
    """Strict JSON: non-finite floats (metrics that do not apply) become null; never NaN tokens."""
    from ..results import strict_json_value

    return json.dumps(strict_json_value(obj), allow_nan=False, **kw)


def load_model(path: str, what: str = "model"):
    """(tokenizer, model in eval mode) from a local `save_pretrained` directory (nothing downloaded);
    a one-line CLIError naming `what` otherwise."""
    from . import CLIError

    d = Path(path)
    if not d.is_dir():
        raise CLIError(f"{what} directory not found: {path}")
    if not (d / "config.json").is_file():
        raise CLIError(f"{what} directory {path} has no config.json (save it with save_pretrained)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loading problem becomes one line
        raise CLIError(f"cannot load {what} from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return tok, model.eval()
