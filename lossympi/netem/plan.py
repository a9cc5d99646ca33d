"""Plans: which backend emulates each impairment of a :class:`LinkSpec` on this machine, and with what arguments."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .commands import _pct, _usec
from .spec import IMPAIRMENTS, LinkSpec, parse_rate

__all__: list[str] = []

@dataclass
class _Plan:
    netem: dict[str, list[str]] = field(default_factory=dict)  # direction -> netem arguments
    rate_bps: float | None = None
    rate_backend: str | None = None  # "tbf" or "netem"
    nft_loss: dict[str, float] = field(default_factory=dict)  # direction -> probability
    ipt_loss: float = 0.0  # direction "in" only
    applied: dict[str, str] = field(default_factory=dict)  # impairment -> backend
    unavailable: list[str] = field(default_factory=list)


def _plan(spec: LinkSpec, caps: Mapping[str, Any]) -> _Plan:
    plan = _Plan()
    dirs = spec.directions
    netem: list[str] = []
    if spec.loss > 0:
        if caps["netem"]:
            netem += ["loss", _pct(spec.loss)]
            plan.applied["loss"] = "netem"
        elif caps["nft"]:
            plan.nft_loss = dict.fromkeys(dirs, spec.loss)
            plan.applied["loss"] = "nft"
        elif caps["iptables"]:
            if "in" in dirs:
                plan.ipt_loss = spec.loss
                plan.applied["loss"] = "iptables"
            if "out" in dirs:
                plan.unavailable.append("loss(out)" if "in" in dirs else "loss")
        else:
            plan.unavailable.append("loss")
    if spec.delay > 0 or spec.jitter > 0:
        if caps["netem"]:
            netem += ["delay", _usec(spec.delay)] + ([_usec(spec.jitter)] if spec.jitter > 0 else [])
    for name in ("delay", "jitter", "reorder", "duplicate"):
        if getattr(spec, name) > 0:
            if caps["netem"]:
                plan.applied[name] = "netem"
            else:
                plan.unavailable.append(name)
    if caps["netem"]:
        if spec.reorder > 0:
            netem += ["reorder", _pct(spec.reorder)]
        if spec.duplicate > 0:
            netem += ["duplicate", _pct(spec.duplicate)]
    if netem:
        plan.netem = {d: list(netem) for d in dirs}
    if spec.rate is not None:
        plan.rate_bps = parse_rate(spec.rate)
        if caps["tbf"]:
            plan.rate_backend = plan.applied["rate"] = "tbf"
        elif caps["netem"]:
            plan.rate_backend = plan.applied["rate"] = "netem"
        else:
            plan.unavailable.append("rate")
    order = {name: k for k, name in enumerate(IMPAIRMENTS)}
    plan.unavailable.sort(key=lambda s: order.get(s.split("(")[0], 99))
    return plan
