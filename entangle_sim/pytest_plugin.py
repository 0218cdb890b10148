"""pytest plugin (auto-loaded through the `pytest11` entry point): the fixture `check_loss`.

    # test_my_loss.py in your project
    import my_losses                      # calls entangle_sim.losses.define(...)

    def test_my_loss(check_loss):
        report = check_loss("my_loss")    # fails the test, naming the state and the error
        assert report.one_step_slopes

The fixture is `entangle_sim.testing.check_loss` (keyword arguments pass through). Without the
entry point (e.g. `PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`), load it with `-p entangle_sim.pytest_plugin`.
"""
from __future__ import annotations

import pytest


@pytest.fixture
def check_loss():
    """`entangle_sim.testing.check_loss`: run the built-in losses' checks on a loss."""
    from entangle_sim.testing import check_loss as _check_loss

    return _check_loss
