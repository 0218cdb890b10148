"""`entangle-sim diagnose-model` end to end on a tiny saved GPT-2 + JSONL, and every bad input."""
import csv
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from entangle_sim.cli import main  # noqa: E402
from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer, toy_rows  # noqa: E402

CONTRACT = ["chosen_logps", "rejected_logps", "chosen_len", "rejected_len", "G_ww", "G_wl", "G_ll", "cos",
            "rho_w", "rho_l", "rho"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    model = tiny_model("gpt2", tok)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rows = toy_rows(6, seed=2)
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_end_to_end(saved, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["diagnose-model", "--model", str(saved / "model"), "--data", str(saved / "pairs.jsonl"),
               "--ref-model", str(saved / "model"), "--loss", "sigmoid", "ipo", "--token-maps", "1",
               "--batch-size", "4", "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_pairs"] == 6 and set(summary["regime_fractions"]) == {"sigmoid", "ipo"}
    assert abs(sum(summary["regime_fractions"]["sigmoid"].values()) - 1) < 1e-9
    with open(out / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and [int(r["pair"]) for r in rows] == list(range(6))
    for c in CONTRACT + ["regime_sigmoid", "regime_ipo", "ref_chosen_logps"]:
        assert c in rows[0], c
    # the reference is the policy itself: log-ratios 0, so DPO's incentives are beta * sigmoid(0) = 0.05
    assert all(abs(float(r["d_w_sigmoid"]) - 0.05) < 1e-6 for r in rows)
    r = rows[0]
    G_ww, G_wl, G_ll = (float(r[k]) for k in ("G_ww", "G_wl", "G_ll"))
    assert abs(float(r["cos"]) - G_wl / (G_ww * G_ll) ** 0.5) < 1e-5
    # one-pair prediction = eta (d_w G_ww - d_l G_wl) at eta = 1
    assert abs(float(r["delta_chosen_sigmoid"]) - 0.05 * (G_ww - G_wl)) < 1e-4 * G_ww
    assert json.loads((out / "summary.json").read_text())["n_pairs"] == 6
    pngs = {p.name for p in out.glob("*.png")}
    assert {"regime_map_sigmoid.png", "regime_map_ipo.png", "histograms.png"} <= pngs
    assert any(n.startswith("token_map_0_") for n in pngs)


def _err(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("entangle-sim: error:"), err
    return err


def test_bad_inputs(saved, tmp_path, capsys):
    m, d = str(saved / "model"), str(saved / "pairs.jsonl")
    assert "not found" in _err(["diagnose-model", "--model", str(tmp_path / "nope"), "--data", d], capsys)
    assert "not found" in _err(["diagnose-model", "--model", m, "--data", str(tmp_path / "x.jsonl")], capsys)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "the movie was ", "chosen": "good "}) + "\n")
    assert "rejected" in _err(["diagnose-model", "--model", m, "--data", str(missing)], capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no rows" in _err(["diagnose-model", "--model", m, "--data", str(empty)], capsys)
    zero = tmp_path / "zero.jsonl"
    # an empty conversational completion renders to nothing after the prompt -> zero tokens
    zero.write_text(json.dumps({"prompt": [{"role": "user", "content": "the movie"}],
                                "chosen": [], "rejected": [{"role": "assistant", "content": "bad"}]}) + "\n")
    assert "zero tokens" in _err(["diagnose-model", "--model", m, "--data", str(zero)], capsys)
    assert "subset" in _err(["diagnose-model", "--model", m, "--data", d, "--subset", "transformer.h.99"], capsys)
    err = _err(["diagnose-model", "--model", m, "--data", d, "--loss", "dpo_nope"], capsys)
    assert "dpo_nope" in err


def test_default_reference_is_the_model_itself(saved, tmp_path, capsys):
    """Without --ref-model the reference is the model (TRL's DPOTrainer with ref_model=None at step 0):
    every log-ratio is 0, so DPO's incentive is beta * sigmoid(0) = 0.05; reference-free losses ignore it."""
    out = tmp_path / "out"
    rc = main(["diagnose-model", "--model", str(saved / "model"), "--data", str(saved / "pairs.jsonl"),
               "--loss", "sigmoid", "simpo", "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reference"]["kind"] == "model" and summary["ref_model"] is None
    assert summary["reference_used_by"] == {"sigmoid": True, "simpo": False}
    with open(out / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(abs(float(r["d_w_sigmoid"]) - 0.05) < 1e-6 for r in rows)
    assert all(r["ref_chosen_logps"] == r["chosen_logps"] for r in rows)


@pytest.mark.parametrize("family,method", [("opt", "exact"), ("bloom", "auto"), ("mixtral", "ghost")])
def test_families_end_to_end(tmp_path, capsys, family, method):
    """diagnose-model on families that used to crash (OPT everywhere, BLOOM's exact, Mixtral's experts)."""
    from entangle_sim.torch.tiny import tiny_family

    tok = tiny_tokenizer()
    model = tiny_family(family, tok)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(3, seed=4)))
    rc = main(["diagnose-model", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "pairs.jsonl"),
               "--method", method, "--token-maps", "1", "--out", str(tmp_path / "out"), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_pairs"] == 3 and summary["method"] == method and summary["dtype"] == "float32"
    assert any(p.name.startswith("token_map_0_") for p in (tmp_path / "out").glob("*.png"))
