"""The PyTorch backend against TRL's own DPOTrainer code on a tiny local GPT-2 (no downloads).

* tokenisation equals the trainer's processed dataset, row by row;
* response log-probs equal what DPOTrainer computes and logs as logps/chosen, logps/rejected
  (float32; tolerance 1e-4 absolute on log-probs of size ~20: float32 round-off of a different
  summation order, observed <= 2e-6);
* a real DPOTrainer run (SGD, constant small learning rate, the probe rows as the training batch)
  with EntanglementCallback: every predicted first-order change has the sign of the realised one.
"""
import copy
import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from entangle_sim.torch import collate, pad_token_id, response_logps, tokenize_rows  # noqa: E402
from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer, toy_rows  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # third-party: TRL/transformers/accelerate notices on a CPU-only tiny run
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")


def _trainer(model, tok, rows, out, **kw):
    from trl import DPOConfig, DPOTrainer

    cfg = dict(output_dir=str(out), per_device_train_batch_size=len(rows), max_steps=1, learning_rate=0.0,
               report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True)
    cfg.update(kw)
    return DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=DPOConfig(**cfg),
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_logps_equal_trl(tmp_path, conversational):
    tok = tiny_tokenizer()
    rows = toy_rows(5, seed=3, conversational=conversational)
    model = tiny_model("gpt2", tok)
    tr = _trainer(model, tok, rows, tmp_path)
    mine = tokenize_rows(tok, rows)
    theirs = [{k: tr.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
              for i in range(len(rows))]
    assert mine == theirs
    tr.model.eval()
    lw, ll = [], []
    for i in range(len(rows)):  # TRL's own loss code, one row at a time, read back from its metrics
        inputs = tr.data_collator([tr.train_dataset[i]])
        with torch.no_grad():
            tr.compute_loss(tr.model, inputs)
        lw.append(tr._metrics["eval"]["logps/chosen"][-1])
        ll.append(tr._metrics["eval"]["logps/rejected"][-1])
    b = collate(mine, pad_token_id(tok))
    with torch.no_grad():
        lp = response_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"])
    B = len(rows)
    diff = max((torch.tensor(lw) - lp[:B]).abs().max().item(), (torch.tensor(ll) - lp[B:]).abs().max().item())
    print(f"max |logp - TRL logp| = {diff:.3g}")
    assert diff < 1e-4
    # and TRL's collator builds the same tensors as ours
    theirs_b = tr.data_collator([tr.train_dataset[i] for i in range(B)])
    for k in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(theirs_b[k], b[k])


def test_callback_predictions_agree_in_sign(tmp_path):
    from entangle_sim.torch import EntanglementCallback

    tok = tiny_tokenizer()
    rows = toy_rows(6, seed=5)
    model = tiny_model("gpt2", tok)
    cb = EntanglementCallback(rows, every_n_steps=1)
    tr = _trainer(model, tok, rows, tmp_path, max_steps=4, learning_rate=2e-3, optim="sgd",
                  lr_scheduler_type="constant", beta=0.1)
    cb.attach(tr)  # first in the callback list: reporting integrations see its values too
    tr.train()
    tr.save_state()
    hist = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    ent = [h for h in hist if "entangle/cos_mean" in h]
    assert len(ent) == 5  # baseline + one per step
    pairs = 0
    for prev, cur in zip(ent, ent[1:]):
        for side in ("chosen", "rejected"):
            p, r = prev[f"entangle/pred_delta_{side}"], cur[f"entangle/real_delta_{side}"]
            print(f"{side}: predicted {p:+.3e} realised {r:+.3e}")
            assert p * r > 0, (side, p, r)
            # first order at a small step: the realised change is close to the prediction
            assert abs(r - p) < 0.2 * abs(p), (side, p, r)
            pairs += 1
        assert prev["entangle/pred_regime"] == cur["entangle/real_regime"]
    assert pairs == 8
    # analyze-log reads the same file and reports predicted vs realised regimes
    from entangle_sim import logs

    summ = logs.summarize(logs.load_log(str(tmp_path / "trainer_state.json")))
    e = summ["entangle"]
    assert e["n_compared"] == 4
    assert e["sign_agreement_chosen"] == e["sign_agreement_rejected"] == e["regime_agreement"] == 4


def test_callback_logs_adam_predictions(tmp_path):
    """With TRL's default AdamW the callback logs entangle/pred_delta_{chosen,rejected}_adam from the live
    optimiser, from the first step on (no Adam state before it), and they have the sign of the realised
    change at the next measurement (probe rows = the training batch, constant small lr)."""
    from entangle_sim.torch import EntanglementCallback

    tok = tiny_tokenizer()
    rows = toy_rows(4, seed=5)
    model = tiny_model("gpt2", tok)
    cb = EntanglementCallback(rows, every_n_steps=1)
    tr = _trainer(model, tok, rows, tmp_path, max_steps=3, learning_rate=1e-4, optim="adamw_torch",
                  lr_scheduler_type="constant", beta=0.1)
    cb.attach(tr)
    tr.train()
    hist = cb.history
    assert len(hist) == 4 and "entangle/pred_delta_chosen_adam" not in hist[0]
    for prev, cur in zip(hist[1:], hist[2:]):
        for side in ("chosen", "rejected"):
            p, r = prev[f"entangle/pred_delta_{side}_adam"], cur[f"entangle/real_delta_{side}"]
            print(f"{side}: Adam-predicted {p:+.3e} realised {r:+.3e}")
            assert p * r > 0, (side, p, r)
            # first order at lr 1e-4 (one AdamW step moves each weight by ~1e-4): observed within 7%
            assert abs(r - p) < 0.2 * abs(p), (side, p, r)


# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` alias (third-party deprecation)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_callback_lora_default_subset_bf16_autocast(tmp_path):
    """A real DPOTrainer with a LoRA `peft_config` and TRL's default bf16 autocast (on CPU too): the
    callback's default subset is the adapters (requires_grad), it measures outside the autocast in
    float32 (its baseline equals a float32 measurement made before training, 1e-5 absolute on log-probs
    of size ~20: float32 round-off; bf16 would be off by ~1e-3), and its predicted regimes match the
    realised ones."""
    peft = pytest.importorskip("peft")
    from trl import DPOConfig, DPOTrainer

    from entangle_sim.torch import EntanglementCallback
    from entangle_sim.torch.tiny import tiny_family

    tok = tiny_tokenizer()
    rows = toy_rows(4, seed=7)
    model = tiny_family("qwen2", tok, width=32)
    b = collate(tokenize_rows(tok, rows), pad_token_id(tok))
    cb = EntanglementCallback(rows, every_n_steps=1)
    cfg = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(rows), max_steps=3,
                    learning_rate=2e-2, optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True,
                    logging_steps=1, save_strategy="no", disable_tqdm=True, beta=0.1)
    assert cfg.bf16  # TRL's default: bf16 autocast, also on CPU
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    tr = DPOTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                    peft_config=lora)
    cb.attach(tr)
    tr.train()
    assert cb.session is not None and all("lora_" in n for n in cb.session.params)
    assert cb.history[0]["dtype"] == "float32"
    hist = cb.history
    assert len(hist) == 4
    # the last measurement (after the last step) equals a float32 measurement of the final model outside
    # autocast; the same under bf16 autocast differs by far more (what the callback used to report)
    final = tr.accelerator.unwrap_model(tr.model, keep_fp32_wrapper=False).eval()  # accelerate's autocast off
    with torch.no_grad():
        lp32 = response_logps(final, b["input_ids"], b["attention_mask"], b["completion_mask"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp16 = response_logps(final, b["input_ids"], b["attention_mask"], b["completion_mask"])
    B = len(rows)
    assert abs(hist[-1]["entangle/logps_chosen"] - float(lp32[:B].mean())) < 1e-5
    assert abs(float(lp16[:B].mean()) - float(lp32[:B].mean())) > 1e-4
    agree = sum(prev["entangle/pred_regime"] == cur["entangle/real_regime"] for prev, cur in zip(hist, hist[1:]))
    assert agree == 3
