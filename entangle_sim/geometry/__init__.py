"""Per-pair and per-token gradient geometry (docs/theory.md §1, §3.3, §5.1 R13, §7.3 bugs 1-2).

Sequence level, per pair:  G_ww = |g_w|^2, G_wl = <g_w, g_l>, G_ll = |g_l|^2, cos, and the condition
ratios rho_w = G_wl/G_ww, rho_l = G_wl/G_ll, rho = max(rho_w, rho_l) (Case 1 <=> rho <= 1).
Token level (R13): the T_w x T_l matrix <g_t(y_w), g_u(y_l)>, whose entries sum to G_wl.

Three ways to get the sequence-level Gram, all exact (same numbers up to round-off):

* `pair_gram(logp_fn, ...)`            any JAX model: vmap over pairs of one reverse pass per
                                       response; holds 2 x chunk x |theta| gradient entries at a time.
* `pair_gram_layerwise(factor_fn, ...)` models that expose their gradient in factored form
                                       (e.g. `policies.transformer.grad_factors(cfg)`): for a matrix used
                                       as y_t = a_t W (+ b) the per-response gradient is sum_t a_t delta_t^T,
                                       so  <dW, dW'> = sum_{t,s} <a_t, a'_s> <delta_t, delta'_s>  and no
                                       parameter-sized per-example gradient is ever formed.
                                       Cost per matrix S*S'*(m+n) instead of S*m*n; memory O(S^2) instead
                                       of O(m n) per pair.
* `response_jacobian` / `jacobian_pair_gram` / `batch_gram`: the full [2B, P] Jacobian, its own-pair
                                       Gram and the 2B x 2B batch Gram (cross-pair terms) that the
                                       trainers record; `preconditioned_gram` in a diagonal metric P.
* a Python loop of `jax.grad` calls (what the official code does) lives only in tests/benchmarks.

Parameter subsets (`subset=`): None (all), a list/tuple of key-path prefixes, or a predicate on the
key-path string. Key paths join dict keys / list indices / attribute names with '/', e.g.
'blocks/0/attn/W_qkv'; prefix 'blocks/0/attn' selects that path and everything below it (not
'blocks/0/attn2'). `param_paths(params)` lists them. A subset that selects nothing raises ValueError.

Modules: `pairs` (sequence level, subsets, chunked vmap, input checks) and `tokens` (token level,
built on the helpers of `pairs`); every public name is importable from here. The cost model that
picks between the exact methods is `geometry_cost`.
"""
from __future__ import annotations

from ..types import (Factor, GradFactors, TokenFactor, TokenGradFactors, param_paths,  # noqa: F401
                     path_str)
from .pairs import (PairGram, Subset, aggregate, batch_gram, check_pair_inputs, factored_vdot,  # noqa: F401
                    gram_stats, jacobian_batch_gram, jacobian_pair_gram, pair_count, pair_gram, pair_gram_layerwise,
                    preconditioned_gram, response_jacobian, subset_predicate)
from .tokens import (TokenGram, token_gram, gram_program)  # noqa: F401
