"""Random pair states for numeric checks of symbolic expressions (sign searches, agreement checks).

    >>> import numpy as np
    >>> from entangle_sim.symbolic.symbols import n_w
    >>> sample_states([n_w], 4, np.random.default_rng(0))[n_w].shape
    (4,)
"""
from __future__ import annotations

import numpy as np


def sample_states(free, n, rng) -> dict:
    """Random states covering typical and extreme values (margins up to |1e3|, lengths 1..4096)."""
    vals = {}
    for s in free:
        name = str(s)
        if name.startswith("n_"):
            vals[s] = rng.choice([1, 2, 3, 5, 8, 16, 64, 512, 4096], size=n).astype(float)
        elif name.startswith("ell"):
            vals[s] = -np.concatenate([rng.exponential(5.0, n // 2), rng.uniform(0, 1e3, n - n // 2)])
        elif s.is_positive:
            vals[s] = rng.choice([0.01, 0.1, 0.5, 1.0, 2.0, 10.0], size=n)
        elif s.is_nonnegative:
            vals[s] = rng.choice([0.0, 0.1, 1.0, 5.0], size=n)
        else:
            vals[s] = rng.normal(0, 2.0, n)
    return vals
