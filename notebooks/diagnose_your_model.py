# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---
# requires: torch, transformers

# %% [markdown]
# # Diagnose your own model
# Gradient entanglement of a Hugging Face causal LM on preference pairs in TRL's format. Here the
# model is a tiny random GPT-2 built locally and saved to a folder; replace `MODEL_DIR` and
# `DATA` with your own `save_pretrained` directory and JSONL file (nothing is downloaded).

# %%
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import matplotlib.pyplot as plt

from entangle_sim.cli import main
from entangle_sim.torch import collate, load_preference_rows, pad_token_id, pair_gram, token_gram, tokenize_rows
from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer, toy_rows

work = Path(os.environ.get("ENTANGLE_SIM_CACHE", tempfile.mkdtemp())) / "diagnose_your_model"
MODEL_DIR, DATA = work / "model", work / "pairs.jsonl"
tok = tiny_tokenizer()
tiny_model("gpt2", tok).save_pretrained(MODEL_DIR)
tok.save_pretrained(MODEL_DIR)
work.mkdir(parents=True, exist_ok=True)
DATA.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(16)))

# %% [markdown]
# ## Per-pair geometry from Python
# `pair_gram` returns G_ww = |g_w|^2, G_wl = <g_w, g_l>, G_ll = |g_l|^2, the cosine and the condition
# ratios; rho = max(G_wl/G_ww, G_wl/G_ll) <= 1 means one DPO step on that pair alone raises the
# chosen and lowers the rejected log-prob (first order).

# %%
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)
rows = load_preference_rows(DATA)
batch = collate(tokenize_rows(tok, rows), pad_token_id(tok))
g = pair_gram(model, batch)
print("mean cos", float(g.cos.mean()), "| pairs with rho <= 1:", int((g.rho <= 1).sum()), "of", len(rows))

# %%
B = len(rows)
tg = token_gram(model, {k: v[[0, B]] for k, v in batch.items()})
print("token inner products sum to G_wl:", float(tg.inner.sum()), float(g.G_wl[0]))
plt.imshow(tg.cos, cmap="RdBu_r", vmin=-1, vmax=1)
plt.xlabel("rejected token")
plt.ylabel("chosen token")
plt.colorbar(label="cos of token gradients");

# %% [markdown]
# ## Where the entanglement lives: the pair Gram split by parameter group
# `by_group=True` splits G_wl into the contributions of the embeddings, each block's attention and
# MLP, the norms and the head (they add up to the total).

# %%
split = pair_gram(model, batch, by_group=True)
{name: round(float(v.G_wl.mean()), 4) for name, v in split.items()}

# %% [markdown]
# ## The command line: verdict, table, regimes per loss, what-if, figures, report.md
# Without `--ref-model` the reference is the model itself, as in TRL's `DPOTrainer(ref_model=None)`.
# The first printed line is the verdict; `out/report.md` has the what-if table and the top pairs.

# %%
out = work / "out"
main(["diagnose-model", "--model", str(MODEL_DIR), "--data", str(DATA), "--loss", "sigmoid", "ipo",
      "--token-maps", "1", "--out", str(out)])
summary = json.loads((out / "summary.json").read_text())
summary["verdict"], summary["regime_fractions"]["sigmoid"], summary["moved_by_batch"], summary["reference"]["kind"]
