"""The diagnosis summary and the one-real-step check on a tiny float64 GPT-2.

* check_step's surrogate step (incentives held fixed) realises exactly the step of the DPO loss
  written out in torch (same log-prob changes to 1e-12 relative: identical gradients);
* SGD: predicted vs realised relative error < 1e-2 at lr 1e-3 and ~10x smaller at lr 1e-4 (first order);
* AdamW from a live state: relative error < 5% at lr 1e-5;
* build_summary has the contract keys; the verdict names the loss, beta and the checkpoint; report.md
  and the two figures; the callback values carry the contract keys.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from entangle_sim.torch import adam, diagnosis, optim_state, theory  # noqa: E402
from entangle_sim.torch.data import collate, tokenize_rows  # noqa: E402
from entangle_sim.torch.geometry import response_logps  # noqa: E402
from entangle_sim.torch.measure import measure_pairs  # noqa: E402
from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer, toy_rows  # noqa: E402

BETA = 0.1


def _lps(model, b):
    return response_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"])


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_model("gpt2", tok, width=16, seed=1).double()
    ex = tokenize_rows(tok, toy_rows(5, seed=7))
    batch = collate(ex, tok.pad_token_id)
    with torch.no_grad():
        lp = _lps(model, batch).numpy()
    ev = theory.evaluate("sigmoid", chosen_logps=lp[:5], rejected_logps=lp[5:], chosen_len=1, rejected_len=1,
                         G_ww=0, G_wl=0, G_ll=0, beta=BETA)
    return tok, model, ex, batch, ev["d_w"] / 5, ev["d_l"] / 5


def test_surrogate_step_is_the_losss_step(setup):
    tok, model, ex, batch, cw, cl = setup
    import copy

    res = diagnosis.check_step(model, batch, cw, cl, lr=1e-2, subset=None)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=1e-2)
    with torch.no_grad():
        lp0 = _lps(ref, batch)
    lp = _lps(ref, batch)
    (-torch.nn.functional.logsigmoid(BETA * (lp[:5] - lp[5:])).mean()).backward()
    opt.step()
    with torch.no_grad():
        real = (_lps(ref, batch) - lp0).numpy()
    np.testing.assert_allclose(np.r_[res["real_chosen"], res["real_rejected"]], real, rtol=1e-12, atol=1e-15)


def test_sgd_check_is_first_order(setup):
    tok, model, ex, batch, cw, cl = setup
    e = [diagnosis.check_summary(diagnosis.check_step(model, batch, cw, cl, lr=lr, subset=None))["max_rel_error"]
         for lr in (1e-3, 1e-4)]
    assert e[0] < 1e-2 and e[0] / e[1] > 5, e


def test_adam_check_and_summary(setup):
    tok, model, ex, batch, cw, cl = setup
    import copy

    trained = copy.deepcopy(model)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    for t in range(5):
        b = collate(tokenize_rows(tok, toy_rows(4, seed=50 + t)), tok.pad_token_id)
        opt.zero_grad()
        lp = _lps(trained, b)
        (-torch.nn.functional.logsigmoid(BETA * (lp[:4] - lp[4:])).mean()).backward()
        opt.step()
    st = optim_state.from_optimizer(opt, trained)
    st.source = "checkpoint-5"
    res = diagnosis.check_step(trained, batch, cw, cl, lr=1e-5, state=st, subset=None)
    s = diagnosis.check_summary(res)
    assert s["max_rel_error"] < 0.05 and s["sign_agreement"] == 1.0, s

    m = measure_pairs(trained, ex, tok.pad_token_id)
    a = adam.measure_adam(trained, ex, tok.pad_token_id, st, subset=None, by_group=True)
    groups = a.pop("by_group")
    m.update({k: v for k, v in a.items() if k.endswith("_adam")})
    summ = diagnosis.build_summary(m, ex, state=st, by_group=groups, k=3, tokenizer=tok)
    assert {"verdict", "top_pairs", "what_if", "by_group", "reference", "optimizer"} <= set(summ)
    assert summ["verdict"].startswith("under sigmoid (β 0.1, AdamW state of checkpoint-5) the chosen log-prob")
    assert len(summ["top_pairs"]) == 3 and "chosen_tokens" in summ["top_pairs"][0]
    assert summ["optimizer"]["kind"] == "adamw" and summ["optimizer"]["step"] == 5.0
    shares = sum(g["share_G_wl"] for g in summ["by_group"].values())
    assert shares == pytest.approx(1.0, rel=1e-9)
    assert summ["reference"]["given"] is False

    md = diagnosis.report_markdown(summ, figures={"by group": "by_group.png"})
    assert md.count(summ["verdict"]) == 1 and "| scenario |" in md and "![by group](by_group.png)" in md
    assert "**" in md.split("## Which pairs")[1]  # tokens not shared with the other completion are bold
    from entangle_sim.plotting.diagnosis import plot_by_group, plot_what_if

    fig = plot_by_group(summ["by_group"])
    assert len(fig.axes[0].patches) == len(summ["by_group"])
    fig = plot_what_if(summ["what_if"], top=5)
    assert len(fig.axes[0].patches) == 10  # SGD and Adam bars of 5 scenarios
    import matplotlib.pyplot as plt
    plt.close("all")

    # EntanglementCallback values from the live optimiser: the contract keys, the mean of the prediction
    cb = adam.callback_metrics(trained, ex, tok.pad_token_id, opt, cw, cl, subset=None)
    pred = adam.adam_step_prediction(trained, batch, optim_state.from_optimizer(opt, trained), cw, cl, subset=None)
    assert set(cb) == {"entangle/pred_delta_chosen_adam", "entangle/pred_delta_rejected_adam"}
    assert cb["entangle/pred_delta_chosen_adam"] == pytest.approx(float(pred["delta_chosen"].mean()), rel=1e-12)
    assert cb["entangle/pred_delta_rejected_adam"] == pytest.approx(float(pred["delta_rejected"].mean()), rel=1e-12)
