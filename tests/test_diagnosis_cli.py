"""`entangle-sim diagnose-model` with the diagnosis flags, end to end on a real tiny Trainer checkpoint.

* `--optimizer-state` (AdamW state of a 2-step transformers.Trainer run), `--screen`, `--check-step`,
  `--losses-from`: the contract keys of summary.json, the `_adam` columns of pairs.csv, the verdict as
  the first printed line;
* the verdict's percentages equal the regime fractions computed here from pairs.csv with DPO's
  first-order formulas (reference = the model: every log-ratio 0, so d_w = d_l = beta sigma(0) = 0.05,
  delta_chosen = d_w G_ww_adam - d_l G_wl_adam, delta_rejected = d_w G_wl_adam - d_l G_ll_adam);
* a run killed after two of three chunks, started again, writes byte-identical outputs to an
  uninterrupted run's;
* bad input: one line `entangle-sim: error: ...`, exit 2.
"""
import csv
import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from entangle_sim.cli import main  # noqa: E402
from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer, toy_rows  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # third-party: transformers/accelerate notices on a CPU-only tiny run
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

USER_FILE = str(Path(__file__).resolve().parent / "data" / "user_losses.py")
CONTRACT = {"verdict", "top_pairs", "what_if", "by_group", "reference", "optimizer"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real transformers.Trainer checkpoint (tiny Llama, 2 AdamW steps, linear schedule: its lr is 0
    at the end, the scheduler's initial lr 1e-3) holding the model, the tokenizer and optimizer.pt."""
    from transformers import Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("ckpt")
    tok = tiny_tokenizer()
    model = tiny_model("llama", tok, width=16)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.tensor([7 + i % 5, 8, 9, 10 + i % 3])
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, save_steps=2,
                             save_strategy="steps", report_to=[], use_cpu=True, learning_rate=1e-3,
                             weight_decay=0.1, logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Rows(), processing_class=tok).train()
    rows = toy_rows(6, seed=3)
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


ADAM_ARGV = ["--check-step", "--batch-size", "3", "--chunk-rows", "2", "--losses-from", USER_FILE]


@pytest.fixture(scope="module", autouse=True)
def _forget_user_losses():
    """`--losses-from` defines its losses in this process; the registry listings of other test modules
    (same pytest worker) must not see them."""
    from entangle_sim import losses

    before = set(losses.user_names())
    yield
    for n in losses.user_names():
        if n not in before:
            losses.undefine(n)


@pytest.fixture(scope="module")
def adam_run(ckpt, tmp_path_factory):
    """One uninterrupted `--optimizer-state --check-step` run (3 chunks of 2 rows): (out, printed)."""
    import contextlib
    import io

    c = str(ckpt / "checkpoint-2")
    out = tmp_path_factory.mktemp("adam") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["diagnose-model", "--model", c, "--data", str(ckpt / "pairs.jsonl"), "--optimizer-state", c,
                   "--out", str(out)] + ADAM_ARGV)
    assert rc == 0
    return out, buf.getvalue()


def test_adam_check_step_contract(adam_run):
    out, printed = adam_run
    s = json.loads((out / "summary.json").read_text())
    assert CONTRACT <= set(s)
    assert printed.splitlines()[0] == s["verdict"]
    assert "AdamW state of checkpoint-2" in s["verdict"]
    assert s["reference"]["kind"] == "model"
    assert s["optimizer"]["kind"] == "adamw" and s["optimizer"]["step"] == 2.0
    rows = _csv(out / "pairs.csv")
    assert len(rows) == 6 and {"G_ww_adam", "G_wl_adam", "G_ll_adam"} <= set(rows[0])
    # the verdict's fractions, recomputed here from pairs.csv with the first-order formulas
    G = {k: np.array([float(r[k]) for r in rows]) for k in ("G_ww_adam", "G_wl_adam", "G_ll_adam")}
    assert all(abs(float(r["d_w_sigmoid"]) - 0.05) < 1e-9 and abs(float(r["d_l_sigmoid"]) - 0.05) < 1e-9
               for r in rows)
    dc = 0.05 * (G["G_ww_adam"] - G["G_wl_adam"])
    dr = 0.05 * (G["G_wl_adam"] - G["G_ll_adam"])
    want = {"fall": np.mean(dc < 0), "both rise": np.mean((dc > 0) & (dr > 0)), "ideal": np.mean((dc > 0) & (dr < 0))}
    got = dict(zip(("fall", "both rise", "ideal"),
                   map(int, re.search(r"fall for (\d+)% of pairs; both rise for (\d+)%; ideal for (\d+)%",
                                      s["verdict"]).groups())))
    assert got == {k: round(100 * v) for k, v in want.items()}, (got, want)
    fr = s["regime_fractions_adam"]["sigmoid"]
    assert fr["both_up"] == pytest.approx(want["both rise"], abs=1e-12)
    assert fr["chosen_up_rejected_down"] == pytest.approx(want["ideal"], abs=1e-12)
    # every registry loss (the user's included) in the what-if table, first order, Adam and SGD
    labels = [r["label"] for r in s["what_if"]]
    assert "user_rpo" in labels and "sigmoid" in labels
    assert all(r["first_order"] for r in s["what_if"])
    assert all("adam" in r and "sgd" in r for r in s["what_if"] if "skipped" not in r)
    # per-group split: the groups' G_wl add up to the total (shares sum to 1)
    assert sum(g["share_G_wl"] for g in s["by_group"].values()) == pytest.approx(1.0, rel=1e-6)
    # --check-step: the checkpoint's lr is 0 at the end of its schedule; the state's initial lr is used
    cs = s["check_step"]
    assert cs["lr"] == 1e-3 and cs["optimizer"] == "adamw" and cs["pairs"] == 6
    print("check-step:", {k: cs[k] for k in ("sign_agreement", "counted", "regime_agreement", "max_rel_error")})
    report = (out / "report.md").read_text()
    assert s["verdict"] in report and "## What to change" in report and "![" in report
    assert {"by_group.png", "what_if.png"} <= set(s["figures"])
    assert any(f.startswith("top_pair_map_0_") for f in s["figures"])


def test_screen(ckpt, capsys):
    """--screen K: CHES over all 6 rows, the exact Gram on the top 4 only; --json is strict JSON."""
    c = str(ckpt / "checkpoint-2")
    rc = main(["diagnose-model", "--model", c, "--data", str(ckpt / "pairs.jsonl"), "--screen", "4", "--json"])
    s = json.loads(capsys.readouterr().out, parse_constant=lambda x: pytest.fail(f"not strict JSON: {x}"))
    assert rc == 0 and s["n_pairs"] == 4 and s["screen"]["k"] == 4 and s["screen"]["n_scored"] == 6
    assert len({p["index"] for p in s["top_pairs"]}) == 4
    assert s["optimizer"]["kind"] == "sgd" and "G_ww_adam" not in s["top_pairs"][0]


def _files(out):
    return {n: (out / n).read_bytes() for n in ("pairs.csv", "summary.json", "report.md")}


def test_killed_run_resumes_identically(ckpt, adam_run, tmp_path, capsys, monkeypatch):
    from entangle_sim.torch import diagnosis

    c = str(ckpt / "checkpoint-2")
    argv = ["diagnose-model", "--model", c, "--data", str(ckpt / "pairs.jsonl"), "--optimizer-state", c] + ADAM_ARGV
    real, calls = diagnosis.measure_rows, []

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third chunk
        return real(*a, **k)

    part = tmp_path / "part"
    monkeypatch.setattr(diagnosis, "measure_rows", dies_on_third)
    assert main(argv + ["--out", str(part)]) == 130
    assert len(list((part / "measure" / "chunks").glob("*.npz"))) == 2
    calls.clear()
    monkeypatch.setattr(diagnosis, "measure_rows", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main(argv + ["--out", str(part)]) == 0
    assert len(calls) == 1  # only the missing chunk was recomputed
    capsys.readouterr()
    assert _files(part) == _files(adam_run[0])


def _err(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("entangle-sim: error:"), err
    return err


def test_bad_inputs(ckpt, tmp_path, capsys, monkeypatch):
    c, d = str(ckpt / "checkpoint-2"), str(ckpt / "pairs.jsonl")
    base = ["diagnose-model", "--model", c, "--data", d]
    assert "--screen" in _err(base + ["--screen", "0"], capsys)
    assert "not found" in _err(base + ["--optimizer-state", str(tmp_path / "nope")], capsys)
    (tmp_path / "ds" / "global_step2").mkdir(parents=True)
    assert "DeepSpeed" in _err(base + ["--optimizer-state", str(tmp_path / "ds")], capsys)
    other = torch.nn.Linear(3, 2)  # an AdamW state of another model: does not match this one
    opt = torch.optim.AdamW(other.parameters())
    other(torch.ones(1, 3)).sum().backward()
    opt.step()
    (tmp_path / "other").mkdir()
    torch.save(opt.state_dict(), tmp_path / "other" / "optimizer.pt")
    _err(base + ["--optimizer-state", str(tmp_path / "other")], capsys)
    # a rank whose peers never come: rank 1 of 2, nobody listening at the rendezvous port
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    assert "peers" in _err(base + ["--out", str(tmp_path / "o"), "--dist-timeout", "2"], capsys)
