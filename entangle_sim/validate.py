"""Argument checks shared by the configs, the Python API and the CLI.

Each check names the argument, raises TypeError for a wrong type (a string, a bool, None where a
number is meant) and ValueError for a bad value (NaN, inf, out of range), and returns the value
as a plain Python int / float.

    >>> real("lr", 0.1, lo=0, lo_open=True)
    0.1
    >>> integer("batch_size", 2.5)
    Traceback (most recent call last):
    TypeError: batch_size must be an integer, got 2.5
"""
from __future__ import annotations

import math
import numbers

#: Seeds are folded into a 32-bit JAX PRNG key; larger ones overflow inside JAX.
SEED_MAX = 2**32 - 1


def _range(name, x, lo, hi, lo_open, hi_open):
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {x!r}")
    if hi is not None and (x > hi or (hi_open and x == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi:g}, got {x!r}")


def real(name: str, value, lo=None, hi=None, *, lo_open=False, hi_open=False) -> float:
    """A finite real number in [lo, hi] (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    _range(name, x, lo, hi, lo_open, hi_open)
    return x


def integer(name: str, value, lo=None, hi=None) -> int:
    """An integer in [lo, hi]; floats such as 2.5 (or 2.0) are refused, numpy integers accepted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    x = int(value)
    _range(name, x, lo, hi, False, False)
    return x


def seed(name: str, value) -> int:
    return integer(name, value, 0, SEED_MAX)
