"""Without torch installed, `import entangle_sim` and the other commands work; the torch command
says in one line how to install the extra. Simulated in a subprocess with sys.modules['torch'] = None."""
import subprocess
import sys

CODE = r"""
import sys
sys.modules["torch"] = None          # `import torch` now raises ImportError
sys.modules["transformers"] = None
import entangle_sim, entangle_sim.losses, entangle_sim.geometry, entangle_sim.logs
from entangle_sim.cli import main
assert main(["losses", "--json"]) == 0
rc = main(["diagnose-model", "--model", "m", "--data", "d.jsonl"])
assert rc == 2, rc
try:
    import entangle_sim.torch
except ImportError as e:
    assert 'pip install "entangle_sim[torch]"' in str(e)
else:
    raise AssertionError("entangle_sim.torch imported without torch")
"""


def test_without_torch():
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("entangle-sim: error:")]
    assert err == ['entangle-sim: error: diagnose-model needs the PyTorch extra: pip install "entangle_sim[torch]"']
