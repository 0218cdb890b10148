"""Policies: each module exposes a frozen config dataclass and `make(cfg) -> Policy`."""
