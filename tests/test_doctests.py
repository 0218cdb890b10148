"""The docstring examples run as doctests (ELLIPSIS, NORMALIZE_WHITESPACE). Examples that take
minutes (a full report or diagnose run) are marked `+SKIP` in place; their tests are named there."""
import doctest
import importlib

import pytest

MODULES = [
    "entangle_sim.losses", "entangle_sim.geometry", "entangle_sim.data", "entangle_sim.regimes",
    "entangle_sim.train", "entangle_sim.mitigations", "entangle_sim.reproduce", "entangle_sim.sentiment",
    "entangle_sim.diagnose", "entangle_sim.report",
    "entangle_sim.policies.softmax", "entangle_sim.policies.linear", "entangle_sim.policies.lastlayer",
    "entangle_sim.policies.transformer",
    "entangle_sim.symbolic.dynamics", "entangle_sim.symbolic.compact", "entangle_sim.symbolic.proofs",
    "entangle_sim.symbolic.softmax_theory", "entangle_sim.symbolic.mitigations",
    "entangle_sim.group.losses", "entangle_sim.group.predict", "entangle_sim.symbolic.group",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    mod = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(mod)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{res.failed} of {res.attempted} examples failed in {name}"
