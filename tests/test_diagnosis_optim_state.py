"""Reading AdamW state from a real transformers.Trainer checkpoint (tiny Llama, 2 CPU steps).

* the checkpoint's optimizer.pt maps to the same tensors as the live trainer.optimizer (mapped by
  object identity, independent of the order logic under test): exact equality;
* the Trainer's weight-decay grouping is recovered (biases/norms in the 0-decay group);
* P = 1/(sqrt(exp_avg_sq / (1 - beta2^step)) + eps) equals torch.optim.AdamW's own step: with
  beta1 = 0 and weight decay 0, one step with gradient g moves theta by exactly -lr P' g with the
  updated v (checked to 1e-12 relative in float64);
* every bad input is one-line `OptimizerStateError`.
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from entangle_sim.torch import optim_state  # noqa: E402
from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # third-party: transformers/accelerate notices on a CPU-only tiny run
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import os

    from transformers import Trainer, TrainingArguments

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
    tr = Trainer(model=model, args=args, train_dataset=Rows())
    tr.train()
    return out / "checkpoint-2", model, tr.optimizer


def test_checkpoint_maps_to_the_live_optimiser(checkpoint):
    path, model, live_opt = checkpoint
    st = optim_state.load_optimizer_state(path, model)
    live = optim_state.from_optimizer(live_opt, model)
    assert st.layout.startswith("transformers.Trainer")
    assert sorted(st.names) == sorted(live.names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for n in live.names:
        assert torch.equal(st.exp_avg_sq[n], live.exp_avg_sq[n]), n
        assert torch.equal(st.exp_avg[n], live.exp_avg[n]), n
        assert st.step[n] == 2.0
    # Trainer's groups: norms (and biases; Llama has none) get no weight decay
    for n in st.names:
        assert st.weight_decay[n] == (0.0 if "norm" in n else 0.1), n
    d = st.describe()
    assert d["source"] == "checkpoint-2" and d["step"] == 2.0 and d["betas"] == [0.9, 0.999] and d["eps"] == 1e-8
    # the linear schedule ends at lr 0 after max_steps; the base lr is kept for predictions
    assert d["lr"] == 0.0 and d["initial_lr"] == 1e-3
    from entangle_sim.torch import adam
    from entangle_sim.torch.data import collate, tokenize_rows
    from entangle_sim.torch.tiny import toy_rows

    tok = tiny_tokenizer()
    b = collate(tokenize_rows(tok, toy_rows(2)), tok.pad_token_id)
    with pytest.raises(ValueError, match="pass lr"):
        adam.adam_step_prediction(model, b, st, [0.1, 0.1], [0.1, 0.1])


def test_preconditioner_is_adamws_denominator():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    model = torch.nn.Module()
    model.w = w
    opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.0, 0.99), eps=1e-3, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        (w ** 3).sum().backward()
        opt.step()
    g = torch.randn(5, 3, dtype=torch.float64)
    st0 = optim_state.from_optimizer(opt, model)
    v_next = 0.99 * st0.exp_avg_sq["w"] + 0.01 * g ** 2     # what the step will hold
    st_next = optim_state.AdamState(["w"], {"w": g}, {"w": v_next}, {"w": 4.0}, {"w": (0.0, 0.99)}, {"w": 1e-3},
                                    {"w": 1e-2}, {"w": 0.0})
    before = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    expected = -1e-2 * st_next.preconditioner("w") * g    # beta1 = 0: m_hat = g
    torch.testing.assert_close(w.detach() - before, expected, rtol=1e-12, atol=0)


def test_bad_inputs_are_one_line_errors(checkpoint, tmp_path):
    path, model, live_opt = checkpoint
    with pytest.raises(optim_state.OptimizerStateError, match="not found"):
        optim_state.load_optimizer_state(tmp_path / "nope", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(optim_state.OptimizerStateError, match="no optimizer.pt"):
        optim_state.load_optimizer_state(tmp_path / "empty", model)
    (tmp_path / "ds" / "global_step2").mkdir(parents=True)
    with pytest.raises(optim_state.OptimizerStateError, match="DeepSpeed"):
        optim_state.load_optimizer_state(tmp_path / "ds", model)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(optim_state.OptimizerStateError, match="cannot read"):
        optim_state.load_optimizer_state(tmp_path / "junk.pt", model)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(optim_state.OptimizerStateError, match="unknown optimiser layout"):
        optim_state.load_optimizer_state(tmp_path / "other.pt", model)
    wider = tiny_model("llama", tiny_tokenizer(), width=32)
    with pytest.raises(optim_state.OptimizerStateError, match="shape"):
        optim_state.load_optimizer_state(path, wider)
    for p in list(model.parameters())[:2]:
        p.requires_grad_(False)
    try:
        with pytest.raises(optim_state.OptimizerStateError, match="trainable"):
            optim_state.load_optimizer_state(path, model)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(optim_state.OptimizerStateError, match="not torch.optim.Adam"):
        optim_state.from_optimizer(sgd, model)
    torch.save(sgd.state_dict(), tmp_path / "sgd.pt")
    with pytest.raises(optim_state.OptimizerStateError, match="not an Adam"):
        optim_state.load_optimizer_state(tmp_path / "sgd.pt", model)


@pytest.mark.slow
def test_trl_dpo_lora_checkpoint(tmp_path, monkeypatch):
    """A TRL DPOTrainer checkpoint of a LoRA run: the adapter-only state maps to the PeftModel's names
    (equal to the live optimiser's tensors), and the adapter-only Adam Gram is measured per group."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    datasets = pytest.importorskip("datasets")
    import numpy as np
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from entangle_sim.torch import adam
    from entangle_sim.torch.data import tokenize_rows
    from entangle_sim.torch.tiny import toy_rows

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = tiny_tokenizer()
    cfg = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                    report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, logging_strategy="no",
                    disable_tqdm=True, weight_decay=0.05)
    tr = DPOTrainer(model=tiny_model("llama", tok, width=16), args=cfg, train_dataset=datasets.Dataset.from_list(toy_rows(4)),
                    processing_class=tok, peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                                 task_type="CAUSAL_LM"))
    tr.train()
    st = optim_state.load_optimizer_state(tmp_path / "checkpoint-2", tr.model)
    live = optim_state.from_optimizer(tr.optimizer, tr.model)
    assert sorted(st.names) == sorted(live.names) and len(st.names) == 8
    assert all(torch.equal(st.exp_avg_sq[n], live.exp_avg_sq[n]) for n in st.names)
    ex = tokenize_rows(tok, toy_rows(3, seed=2))
    a = adam.measure_adam(tr.model, ex, tok.pad_token_id, st, by_group=True)
    assert list(a["by_group"]) == ["lora"] and np.all(np.isfinite(a["G_wl_adam"])) and np.all(a["G_ww_adam"] > 0)
