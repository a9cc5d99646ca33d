"""Plans: which backend emulates each impairment of a :class:`LinkSpec` on this machine, and with what arguments."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .commands import _pct, _usec
from .delayline import LineParams
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
    line: LineParams | None = None  # the NFQUEUE delay line at the host's ingress (direction "in")


_LINE = ("delay", "jitter", "reorder", "gemodel")  # what the delay line (or netem) does


def _uses_line(spec: LinkSpec, caps: Mapping[str, Any]) -> bool:
    """The delay line, not netem: no sch_netem, or jitter that must keep the order (netem's tfifo reorders)."""
    asked = any(getattr(spec, name) for name in _LINE)
    return bool(caps.get("nfqueue")) and asked and (not caps["netem"] or (spec.jitter > 0 and not spec.jitter_reorders))


def _plan_line(spec: LinkSpec, plan: _Plan) -> None:
    """The delay line does delay, jitter, reorder and Gilbert-Elliott loss on the host's ingress only."""
    dirs = spec.directions
    asked = [name for name in _LINE if getattr(spec, name)]
    if "in" in dirs:
        plan.line = LineParams(delay=spec.delay, jitter=spec.jitter, jitter_reorders=spec.jitter_reorders,
                               reorder=spec.reorder, gemodel=spec.gemodel, queues=spec.queues,
                               fail_open=spec.fail_open)
        plan.applied.update(dict.fromkeys(asked, "nfqueue"))
    if "out" in dirs:
        plan.unavailable += [f"{name}(out)" if "in" in dirs else name for name in asked]


def _netem_delay_args(spec: LinkSpec, caps: Mapping[str, Any], plan: _Plan) -> list[str]:
    """netem arguments for delay, jitter, reorder, duplicate and Gilbert-Elliott loss (or mark them unavailable)."""
    netem: list[str] = []
    if caps["netem"]:
        if spec.gemodel is not None:
            netem += ["loss", "gemodel", *(_pct(x) for x in spec.gemodel)]
        if spec.delay > 0 or spec.jitter > 0:
            netem += ["delay", _usec(spec.delay)] + ([_usec(spec.jitter)] if spec.jitter > 0 else [])
        if spec.reorder > 0:
            netem += ["reorder", _pct(spec.reorder)]
    for name in (*_LINE, "duplicate"):
        if getattr(spec, name):
            if caps["netem"]:
                plan.applied[name] = "netem"
            else:
                plan.unavailable.append(name)
    if caps["netem"] and spec.duplicate > 0:
        netem += ["duplicate", _pct(spec.duplicate)]
    return netem


def _plan(spec: LinkSpec, caps: Mapping[str, Any]) -> _Plan:
    plan = _Plan()
    dirs = spec.directions
    netem: list[str] = []
    line = _uses_line(spec, caps)
    if spec.loss > 0:
        if caps["netem"] and (spec.gemodel is None or line):  # netem has one loss model: gemodel takes it
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
    if line:
        _plan_line(spec, plan)
        if spec.duplicate > 0:
            if caps["netem"]:
                netem += ["duplicate", _pct(spec.duplicate)]
                plan.applied["duplicate"] = "netem"
            else:
                plan.unavailable.append("duplicate")
    else:
        netem += _netem_delay_args(spec, caps, plan)
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
