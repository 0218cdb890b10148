"""The registry of losses: `register`, `get` (by name or alias, with a suggestion for a typo),
`names`, `aliases`, the `registered` decorator the built-in modules use, and `incentives` (d_w, d_l
by autodiff).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from ..symbolic.dynamics import set_name_resolver
from .base import FALPHA, FDIV, TRL_SEMANTICS, TRL_TESTED, did_you_mean
from .spec import LossSpec

# --------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, LossSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: LossSpec, *, replace: bool = False) -> LossSpec:
    """Add a loss to the registry (`replace=True`: a loss of the same name is replaced in place,
    keeping its position in `names()`)."""
    if replace and spec.name in _REGISTRY:
        _REGISTRY[spec.name] = spec
        return spec
    for key in (spec.name, *spec.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"loss name {key!r} registered twice")
    _REGISTRY[spec.name] = spec
    for a in spec.aliases:
        _ALIASES[a] = spec.name
    return spec


def unregister(name: str) -> None:
    """Remove a registered loss by its canonical name (and its aliases)."""
    spec = _REGISTRY.pop(name)
    for a in spec.aliases:
        _ALIASES.pop(a, None)


def names() -> list[str]:
    """Canonical names of every registered loss, in registration order."""
    return list(_REGISTRY)


def aliases() -> dict[str, str]:
    """alias -> canonical name."""
    return dict(_ALIASES)


def get(name: str) -> LossSpec:
    """The loss registered under `name` or one of its aliases; ValueError with a suggestion."""
    if isinstance(name, LossSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"loss name must be a string (or a LossSpec), got {name!r} ({type(name).__name__})")
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}" + did_you_mean(name, [*_REGISTRY, *_ALIASES])
                         + "; run `entangle-sim losses` for the list")
    return _REGISTRY[key]


set_name_resolver(get, names)  # symbolic.derive("name") resolves here; the engine never imports us


def registered(name, description, hypers, trl=None, **kw):
    if trl is not None:
        kw.setdefault("trl_version", f"{TRL_SEMANTICS} (tested against {TRL_TESTED})")

    def deco(build):
        register(LossSpec(name=name, description=description, build=build, hypers=tuple(hypers),
                          trl=trl, **kw))
        return build
    return deco


DPO_F = (FDIV, FALPHA)


def incentives(spec: LossSpec | str, chosen_logps, rejected_logps, ref_chosen_logps=0.0,
               ref_rejected_logps=0.0, chosen_len=1.0, rejected_len=1.0, **hp):
    """(d_w, d_l) = (-dL/dl_w, +dL/dl_l) of the per-pair loss by autodiff (vectorised over pairs)."""
    spec = get(spec)

    def loss(lw, ll, *rest):
        return spec(lw, ll, *rest, **hp)

    args = [jnp.asarray(x, dtype=jnp.result_type(float)) for x in (
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_len, rejected_len)]
    shape = jnp.broadcast_shapes(*(a.shape for a in args))
    args = [jnp.broadcast_to(a, shape).ravel() for a in args]
    g = jax.vmap(jax.grad(loss, argnums=(0, 1)))(*args)
    return -g[0].reshape(shape), g[1].reshape(shape)
