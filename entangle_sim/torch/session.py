"""One measurement session: the model, the parameter selection, the method and the tokenised pairs, shared
by `entangle-sim diagnose-model` and `EntanglementCallback`.

    s = MeasurementSession(model, pad_token_id=pad, subset="trainable", method="auto")
    m = s.measure(examples)                       # log-probs, lengths, G_ww, G_wl, G_ll, cos, rho per pair
    dw, dl = s.predict(examples, c_w, c_l)        # batch-level first-order changes (full response Gram)
    dw, dl = s.predict_stream(lambda: chunks_of_examples(), c_w, c_l)   # the same, rows streamed twice
    t = s.token_map(examples[0])                  # TokenGram of one pair

`entangle_sim.torch.diagnosis_run.run_diagnosis` (the `diagnose-model` command) builds the whole diagnosis
on one session: every chunk of rows, the reference, every loss's prediction and the token maps.

Every call runs in eval mode, outside any autocast, in the parameters' dtype (`dtype`), and goes through
the same capture, verification and fallback as `pair_gram` / `directional` / `token_gram`.
"""
from __future__ import annotations

import numpy as np
import torch

from .data import collate
from .geometry import check_method, directional, directional_at, directional_vector, measuring, pair_gram, response_logps, select_parameters, token_gram


class MeasurementSession:
    """Measure pairs of one model with one parameter selection and method (see module docstring).

    subset: None (all), "trainable" (requires_grad: the adapters under PEFT) or name prefixes;
    method: "auto" | "ghost" | "exact", honoured by every measurement (pair Gram, batch prediction,
    token maps); batch_size: pairs per capture; max_length: TRL's truncation.
    """

    def __init__(self, model, *, pad_token_id: int, subset=None, method: str = "auto", batch_size: int = 8,
                 max_length: int | None = 1024):
        check_method(method)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.pad, self.subset, self.method = model, int(pad_token_id), subset, method
        self.batch_size, self.max_length = batch_size, max_length
        self.params = select_parameters(model, subset)   # unknown prefix -> ValueError now, not later

    @property
    def dtype(self) -> str:
        """The dtype the measurement runs in: 'float64' for a float64 model, else 'float32' (accumulation;
        a bf16/fp16 model's forward stays in its own dtype)."""
        p = next(iter(self.params.values()))
        return "float64" if p.dtype == torch.float64 else ("float32" if p.dtype == torch.float32 else
                                                            f"float32 accumulation of a {str(p.dtype)[6:]} model")

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def _batch(self, exs):
        return collate(exs, self.pad, max_length=self.max_length)

    def measure(self, examples: list[dict], progress=None) -> dict[str, np.ndarray]:
        """Per pair (numpy [B]): chosen/rejected log-probs and lengths, prompt length, G_ww, G_wl, G_ll,
        cos, rho_w, rho_l, rho. `progress(n)` is called after each batch of n pairs."""
        cols: dict[str, list] = {}
        for s in range(0, len(examples), self.batch_size):
            exs = examples[s:s + self.batch_size]
            batch = self._batch(exs)
            g, (lw, ll) = pair_gram(self.model, batch, subset=self.subset, method=self.method,
                                    chunk_size=self.batch_size, return_logps=True)
            cm = batch["completion_mask"]
            B = len(exs)
            part = {"chosen_logps": lw, "rejected_logps": ll, "chosen_len": cm[:B].sum(1),
                    "rejected_len": cm[B:].sum(1),
                    "prompt_len": torch.tensor([len(e["prompt_ids"]) for e in exs]), **g._asdict()}
            for k, v in part.items():
                cols.setdefault(k, []).append(v.detach().double().numpy())
            if progress is not None:
                progress(B)
        return {k: np.concatenate(v) for k, v in cols.items()}

    def predict(self, examples: list[dict], c_w, c_l) -> tuple[np.ndarray, np.ndarray]:
        """First-order changes (per unit step) of every chosen and rejected log-prob for the step
        theta += sum_j (c_w[j] g_w,j - c_l[j] g_l,j): delta_i = sum_j w_j <g_i, g_j> (full 2B x 2B Gram)."""
        batch = self._batch(examples)
        w = torch.cat([torch.as_tensor(np.asarray(c_w), dtype=torch.float64),
                       -torch.as_tensor(np.asarray(c_l), dtype=torch.float64)])
        d = directional(self.model, batch, w, subset=self.subset, method=self.method,
                        chunk_size=2 * self.batch_size).double().numpy()
        B = len(examples)
        return d[:B], d[B:]

    def predict_stream(self, chunks, c_w, c_l) -> tuple[np.ndarray, np.ndarray]:
        """`predict` over pairs that arrive in chunks: chunks() returns a fresh iterator of lists of
        tokenised pairs (in order, together the B pairs of c_w / c_l) and is called twice. Pass 1
        accumulates v = sum_j (c_w[j] g_w,j - c_l[j] g_l,j) chunk by chunk (parameter-sized), pass 2
        gives <g_i, v> chunk by chunk, so only one chunk of pairs is held at a time. Equals `predict`
        up to the summation order (round-off)."""
        acc = torch.float64
        cw = torch.as_tensor(np.asarray(c_w), dtype=acc)
        cl = torch.as_tensor(np.asarray(c_l), dtype=acc)
        if cw.shape != cl.shape or cw.dim() != 1:
            raise ValueError(f"c_w and c_l must be [B] arrays, got {tuple(cw.shape)} and {tuple(cl.shape)}")
        B = cw.shape[0]

        def weighted():
            s = 0
            for exs in chunks():
                b = len(exs)
                if s + b > B:
                    raise ValueError(f"chunks() gave more than the {B} pairs of c_w / c_l")
                yield self._batch(exs), torch.cat([cw[s:s + b], -cl[s:s + b]])
                s += b
            if s != B:
                raise ValueError(f"chunks() gave {s} pairs, c_w / c_l have {B}")

        step = 2 * self.batch_size
        v = directional_vector(self.model, weighted(), subset=self.subset, chunk_size=step)
        dw, dl = [], []
        for exs in chunks():
            b = len(exs)
            d = directional_at(self.model, self._batch(exs), v, subset=self.subset, method=self.method,
                               chunk_size=step).double().numpy()
            dw.append(d[:b])
            dl.append(d[b:])
        return np.concatenate(dw), np.concatenate(dl)

    def token_map(self, example: dict):
        """`TokenGram` of one tokenised pair."""
        return token_gram(self.model, self._batch([example]), subset=self.subset, method=self.method)

    def logps(self, examples: list[dict], model=None) -> tuple[np.ndarray, np.ndarray]:
        """(chosen, rejected) summed completion log-probs [B] of `model` (default: the session's)."""
        model = self.model if model is None else model
        rw, rl = [], []
        with measuring(model), torch.no_grad():
            for s in range(0, len(examples), self.batch_size):
                exs = examples[s:s + self.batch_size]
                b = self._batch(exs)
                lp = response_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"])
                rw.append(lp[:len(exs)].double().numpy())
                rl.append(lp[len(exs):].double().numpy())
        return np.concatenate(rw), np.concatenate(rl)
