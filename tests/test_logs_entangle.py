"""analyze-log on a trainer_state.json with `entangle/*` entries (EntanglementCallback); no torch needed."""
import json

from entangle_sim import logs
from entangle_sim.cli import main


def _state(tmp_path):
    hist = [{"entangle/cos_mean": 0.5, "entangle/rho_mean": 0.7, "entangle/pred_delta_chosen": 0.2,
             "entangle/pred_delta_rejected": -0.1, "step": 0}]
    for step, lc, lr, real in ((1, -10.0, -11.0, (0.3, -0.2)), (2, -9.9, -11.3, (-0.1, -0.3))):
        hist.append({"loss": 0.69, "logps/chosen": lc, "logps/rejected": lr, "step": step,
                     "entangle/cos_mean": 0.6, "entangle/rho_mean": 0.9,
                     "entangle/pred_delta_chosen": 0.05, "entangle/pred_delta_rejected": 0.02,
                     "entangle/real_delta_chosen": real[0], "entangle/real_delta_rejected": real[1]})
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({"log_history": hist}))
    return p


def test_entangle_block(tmp_path, capsys):
    p = _state(tmp_path)
    e = logs.summarize(logs.load_log(str(p)))["entangle"]
    assert e["n_measurements"] == 3 and e["n_compared"] == 2
    # step 0 -> 1: predicted (+, -) realised (+, -): agree; step 1 -> 2: predicted (+, +), realised (-, -)
    assert e["comparisons"][0]["pred_regime"] == e["comparisons"][0]["real_regime"] == "chosen_up_rejected_down"
    assert (e["comparisons"][1]["pred_regime"], e["comparisons"][1]["real_regime"]) == ("both_up", "both_down")
    assert (e["sign_agreement_chosen"], e["sign_agreement_rejected"], e["regime_agreement"]) == (1, 1, 1)
    assert main(["analyze-log", str(p)]) == 0
    assert "regime 1/2" in capsys.readouterr().out


def test_group_keys_are_not_counted_as_pair_measurements(tmp_path):
    """A log holding GRPO callback entries (entangle/group_*) too: the pair reader counts only its own."""
    p = _state(tmp_path)
    state = json.loads(p.read_text())
    state["log_history"].append({"step": 3, "entangle/group_cos_mean": 0.1, "entangle/group_n_groups": 4})
    p.write_text(json.dumps(state))
    e = logs.summarize(logs.load_log(str(p)))["entangle"]
    assert e["n_measurements"] == 3 and e["n_compared"] == 2
