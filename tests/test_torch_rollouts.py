"""Group entanglement on a torch model: `diagnose_rollouts`, `entangle-sim diagnose-rollouts`,
`GroupEntanglementCallback`.

* The measured K and per-rollout prediction delta = eta K w against a float64 brute force: per-completion
  gradients by ordinary autograd (one backward each, no capture), K = g g^T, weights from `group.predict`.
* The prediction against a real SGD step on a tiny float64 model: the step theta += eta sum_i w_i g_i is one
  SGD step on TRL's loss of the group (at the on-policy step its gradient is -sum_i w_i g_i, checked against
  TRL's own `_compute_loss` in tests/test_group_trl.py); the error of the first-order prediction is O(eta^2).
"""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from entangle_sim.cli import main  # noqa: E402
from entangle_sim.group.predict import predict  # noqa: E402
from entangle_sim.torch.rollouts import diagnose_rollouts, load_rollout_rows, tokenize_group  # noqa: E402
from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer  # noqa: E402

ROWS = [
    {"prompt": "the movie was ", "completions": ["good fun <eos>", "bad <eos>", "good", "awful boring long <eos>"],
     "rewards": [1.0, 0.0, 1.0, 0.0]},
    {"prompt": "the film story was ", "completions": ["great", "sad very sad", "fine <eos>", "bad"],
     "rewards": [0.5, -1.0, 2.0, 0.0]},
    {"prompt": "i liked it ", "completions": ["a lot <eos>", "not", "very", "so"], "rewards": [1, 1, 1, 1]},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model64(tok):
    return tiny_model("gpt2", tok, width=16, layers=1, seed=3).double()


def _brute(model, tok, row):
    """Per-completion gradients by plain autograd, float64, on ids built without the module under test."""
    p = tok(text=row["prompt"])["input_ids"]
    params = [q for q in model.parameters()]
    gs, lps = [], []
    for c in row["completions"]:
        cids = tok(text=c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + cids])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        ell = lp[torch.arange(len(p) - 1, ids.shape[1] - 1), ids[0, len(p):]].sum()
        g = torch.autograd.grad(ell, params, allow_unused=True)
        gs.append(torch.cat([(torch.zeros_like(q) if x is None else x).reshape(-1) for q, x in zip(params, g)]))
        lps.append(float(ell.detach()))
    g = torch.stack(gs)
    return (g @ g.T).numpy(), g, np.array(lps), [len(tok(text=c, add_special_tokens=False)["input_ids"])
                                                  for c in row["completions"]]


@pytest.mark.parametrize("method", ["ghost", "exact"])
def test_gram_and_prediction_match_float64_brute_force(model64, tok, method):
    d = diagnose_rollouts(model64, tok, ROWS, loss_type="dr_grpo", eta=0.3, method=method,
                          params={"max_completion_length": 8})
    for gi, row in enumerate(ROWS):
        K, _, lps, lens = _brute(model64, tok, row)
        Km = np.asarray(d["groups"][gi]["gram"])
        # float64 model, two float64 computations of the same inner products: rounding only
        assert np.abs(Km - K).max() <= 1e-9 * np.abs(K).max()
        ref = predict("dr_grpo", row["rewards"], lens, K, 0.3, max_completion_length=8)
        got = [r for r in d["rollouts"] if r["group"] == gi]
        assert [r["length"] for r in got] == lens
        np.testing.assert_allclose([r["logp"] for r in got], lps, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose([r["weight"] for r in got], ref["weights"], rtol=1e-12, atol=0)
        scale = np.abs(ref["delta"]).max() + 1e-300
        assert np.abs(np.array([r["delta"] for r in got]) - ref["delta"]).max() <= 1e-9 * scale
        assert [r["regime"] for r in got] == ref["regimes"]
        ev = np.asarray(d["groups"][gi]["eigenvalues"])
        np.testing.assert_allclose(ev, ref["eigenvalues"], rtol=1e-8, atol=1e-9 * max([1.0, *np.abs(ev)]))
    assert d["groups"][2]["zero_variance"] and all(r["delta"] == 0 for r in d["rollouts"] if r["group"] == 2)
    o = d["overall"]
    assert o["n_zero_variance"] == 1 and o["n_groups"] == 3 and o["n_rollouts"] == 12
    n_correct = sum(r["advantage"] > 0 for r in d["rollouts"])
    n_fall = sum(r["regime"] == "correct_falls" for r in d["rollouts"])
    assert o["n_correct"] == n_correct and o["n_correct_fall"] == n_fall


def test_prediction_vs_real_sgd_step_is_first_order(model64, tok):
    """Realised minus predicted change after one SGD step shrinks ~4x when eta halves (O(eta^2))."""
    row = ROWS[1]
    d = diagnose_rollouts(model64, tok, [row], loss_type="grpo", eta=1.0)
    _, g, lp0, _ = _brute(model64, tok, row)
    w = torch.tensor([r["weight"] for r in d["rollouts"]], dtype=torch.float64)
    Kw = np.array([r["delta"] for r in d["rollouts"]])   # eta = 1
    step = (w[:, None] * g).sum(0)                        # = -grad of TRL's loss at the on-policy step
    params = list(model64.parameters())
    theta0 = [q.detach().clone() for q in params]
    errs = []
    etas = [2e-4, 1e-4, 5e-5]
    try:
        for eta in etas:
            with torch.no_grad():
                s = 0
                for q, q0 in zip(params, theta0):
                    q.copy_(q0 + eta * step[s:s + q.numel()].reshape(q.shape))
                    s += q.numel()
            lp1 = _brute(model64, tok, row)[2]
            errs.append(np.abs((lp1 - lp0) - eta * Kw).max())
            assert np.all(np.sign(lp1 - lp0) == np.sign(Kw))   # every predicted direction realised
    finally:
        with torch.no_grad():
            for q, q0 in zip(params, theta0):
                q.copy_(q0)
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    # second-order remainder: halving eta divides it by 4, up to the relative third-order correction
    # O(eta |step|) (measured 4.05 and 4.03; errors 1.8e-6, 4.3e-7, 1.1e-7 against max |Kw| = 19)
    assert all(3.5 < r < 4.5 for r in ratios), (errs, ratios)
    assert errs[-1] < 1e-2 * etas[-1] * np.abs(Kw).max()  # the first-order term dominates


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tiny_rollouts")
    model = tiny_model("gpt2", tok)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return d


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_cli_end_to_end(saved, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["diagnose-rollouts", "--model", str(saved / "model"), "--data", str(saved / "rows.jsonl"),
               "--loss-type", "bnpo", "--param", "scale_rewards=batch", "--eta", "0.01", "--groups", "3",
               "--out", str(out), "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    for k in ("n_groups", "n_rollouts", "n_correct", "n_correct_fall", "frac_correct_fall", "n_zero_variance",
              "frac_zero_variance", "effective_rank_mean", "groups", "loss_type", "params"):
        assert k in s, k
    assert s["n_groups"] == 3 and s["n_rollouts"] == 12 and s["loss_type"] == "bnpo"
    assert s["params"]["scale_rewards"] == "batch"
    for g in s["groups"]:
        ev = g["eigenvalues"]
        assert ev == sorted(ev, reverse=True) and all(x >= 0 for x in ev)
        if ev:   # participation ratio recomputed from the reported eigenvalues
            assert math.isclose(g["effective_rank"], sum(ev) ** 2 / sum(x * x for x in ev), rel_tol=1e-9)
            assert 1 - 1e-9 <= g["effective_rank"] <= len(ev) + 1e-9
    import csv
    with open(out / "rollouts.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {"delta", "regime", "advantage", "weight", "K_ii"} <= set(rows[0])
    assert json.loads((out / "summary.json").read_text())["n_rollouts"] == 12
    assert {"rollout_deltas.png", "rollout_spectra.png"} <= {p.name for p in out.glob("*.png")}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "the ", "completions": ["a", "b", "c"], "rewards": [1, 0]}, "2 rewards for 3 completions"),
    ({"prompt": "the ", "completions": ["a"], "rewards": [1]}, "G >= 2"),
    ({"prompt": "the ", "completions": ["a", "b"], "rewards": [1, float("nan")]}, "finite"),
    ({"prompt": "the ", "completions": ["a", "b"]}, "missing column"),
])
def test_cli_bad_rows_exit_2(saved, tmp_path, capsys, bad, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(bad) + "\n")   # json writes NaN as a NaN token
    rc = main(["diagnose-rollouts", "--model", str(saved / "model"), "--data", str(p)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and err.startswith("entangle-sim: error:")


def test_cli_unknown_loss_type_exit_2(saved, capsys):
    rc = main(["diagnose-rollouts", "--model", str(saved / "model"), "--data", str(saved / "rows.jsonl"),
               "--loss-type", "grpoo"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown group loss type 'grpoo'" in err and err.count("\n") == 1


def test_conversational_tokenisation_is_the_template_suffix(tok):
    row = {"prompt": [{"role": "user", "content": "the movie"}],
           "completions": [[{"role": "assistant", "content": "good"}], [{"role": "assistant", "content": "bad"}]],
           "rewards": [1, 0]}
    ex = tokenize_group(tok, load_rollout_rows([row])[0])
    gen = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ex["prompt_ids"] == list(gen["input_ids"])
    # the template renders "<|assistant|> good <|end|> ": after the generation prompt, the content and end-of-turn
    assert tok.convert_ids_to_tokens(ex["completion_ids"][0]) == ["good", "<|end|>"]


# ---------------------------------------------------------------------------------------------------
# GRPOTrainer callback
# ---------------------------------------------------------------------------------------------------
def test_probe_measurement_matches_float64_brute_force(model64, tok):
    """The callback's batch prediction: delta = eta sum_j w_j <g_i, g_j> over ALL probe completions
    (cross-group terms included), w = TRL's weights of the probe set as one micro-batch."""
    from entangle_sim.torch.group_callback import measure_probe

    rows = ROWS[:2]
    exs = [tokenize_group(tok, r) for r in rows]
    m = measure_probe(model64, exs, [r["rewards"] for r in rows], pad=tok.pad_token_id, loss_type="grpo",
                      params={}, eta=0.5, subset=None)
    gs, lens, lps = [], [], []
    for r in rows:
        _, g, lp, n = _brute(model64, tok, r)
        gs.append(g), lens.extend(n), lps.extend(lp)
    g = torch.cat(gs)
    K = (g @ g.T).numpy()
    ref = predict("grpo", [x for r in rows for x in r["rewards"]], lens, K, 0.5, num_generations=4)
    np.testing.assert_allclose(m["weights"], ref["weights"], rtol=1e-12)
    assert np.abs(m["delta"] - ref["delta"]).max() <= 1e-9 * np.abs(ref["delta"]).max()
    np.testing.assert_allclose(m["logps"], lps, rtol=1e-12)
    A = np.asarray(ref["advantages"])
    d = np.asarray(ref["delta"])
    assert math.isclose(m["group_pred_delta_correct"], d[A > 0].mean(), rel_tol=1e-9)
    assert m["group_frac_correct_fall"] == float((d[A > 0] < 0).mean())
    ranks = [predict("grpo", r["rewards"], lens[4 * k:4 * k + 4], K[4 * k:4 * k + 4, 4 * k:4 * k + 4])
             for k, r in enumerate(rows)]   # effective rank is scale-free: the group's own weights suffice
    assert math.isclose(m["group_effective_rank"], np.mean([x["effective_rank"] for x in ranks]), rel_tol=1e-8)


# third-party: TRL/transformers/accelerate notices on a CPU-only tiny run (GRPOConfig's deprecated aliases)
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
def test_grpo_trainer_run_logs_group_keys_and_analyze_log_reads_them(tok, tmp_path, capsys):
    """A real TRL GRPOTrainer run on CPU (tiny GPT-2, 4 generations of <= 4 tokens, a fixed reward)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from entangle_sim.torch.group_callback import GroupEntanglementCallback

    model = tiny_model("gpt2", tok, seed=1)
    ds = Dataset.from_list([{"prompt": "the movie was "}, {"prompt": "the film was "}] * 2)

    def reward(completions, **kw):   # fixed, and varied within a group so the loss is not zero
        return [float(len(c) % 3) for c in completions]

    cb = GroupEntanglementCallback(ROWS[:2], every_n_steps=1)
    args = GRPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, max_steps=2, learning_rate=1e-2, lr_scheduler_type="constant",
                      logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                      disable_tqdm=True, seed=0)
    tr = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                     callbacks=[cb])
    tr.train()
    tr.state.save_to_json(str(tmp_path / "trainer_state.json"))
    ent = [h for h in tr.state.log_history if "entangle/group_effective_rank" in h]
    assert [h["step"] for h in ent] == [0, 1, 2]
    for h in ent:
        assert h["entangle/group_eta"] == pytest.approx(1e-2)
        assert 1 <= h["entangle/group_effective_rank"] <= 4
    # realised change between measurements = difference of the logged probe means (the run moved them)
    for a, b in zip(ent, ent[1:]):
        real = b["entangle/group_real_delta_correct"]
        assert real == pytest.approx(b["entangle/group_logps_correct"] - a["entangle/group_logps_correct"], abs=1e-9)
    assert any(abs(b["entangle/group_real_delta_correct"]) > 0 for b in ent[1:])
    capsys.readouterr()   # the trainer's own log lines
    rc = main(["analyze-log", str(tmp_path / "trainer_state.json"), "--json"])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["group_entangle"]["n_measurements"] == 3 and s["group_entangle"]["n_compared"] == 2
    assert s["group_entangle"]["series"]["effective_rank"][0][1] == pytest.approx(ent[0]["entangle/group_effective_rank"])


def test_without_torch_says_how_to_install():
    import subprocess
    import sys

    code = ("import sys\nsys.modules['torch'] = None\nsys.modules['transformers'] = None\n"
            "from entangle_sim.cli import main\n"
            "sys.exit(main(['diagnose-rollouts', '--model', 'm', '--data', 'd.jsonl']))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip() == ('entangle-sim: error: diagnose-rollouts needs the PyTorch extra: '
                                'pip install "entangle_sim[torch]"')
