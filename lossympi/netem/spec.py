"""What a link should do: :class:`LinkSpec` (loss, rate, delay, jitter, reorder, duplicate, Gilbert-Elliott loss)
and :func:`parse_rate`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["DIRECTIONS", "IMPAIRMENTS", "LinkSpec", "parse_rate"]

IMPAIRMENTS = ("loss", "rate", "delay", "jitter", "reorder", "duplicate", "gemodel")
"""Impairment names, as used in :func:`capabilities` ``["unavailable"]`` and :attr:`Cluster.applied`."""
DIRECTIONS = ("in", "out", "both")
"""Accepted values of :attr:`LinkSpec.direction`."""
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?))?(bit|bps)?\s*$", re.IGNORECASE)
_RATE_MULT = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_RATE_MULT_I = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_rate(rate: str | float) -> float:
    """Parse a ``tc``-style rate into bits per second.

    Parameters
    ----------
    rate : str or float
        ``"10gbit"``, ``"200mbit"``, ``"500kbit"``, ``"1kibit"`` (powers of 1024), ``"100mbps"`` (bytes per second,
        as in ``tc``), or a bare number of bits per second.

    Returns
    -------
    float
        The rate in bits per second (> 0).

    Raises
    ------
    ValueError
        The rate cannot be parsed or is not positive.
    """
    if isinstance(rate, bool):
        raise ValueError(f"invalid rate {rate!r}")
    if isinstance(rate, int | float):
        bps = float(rate)
    else:
        m = _RATE_RE.match(str(rate))
        if m is None:
            raise ValueError(f"invalid rate {rate!r}: expected e.g. '10gbit', '200mbit', '500kbit', '100mbps'")
        number, prefix, binary, unit = m.groups()
        prefix = (prefix or "").lower()
        mult = (_RATE_MULT_I if binary else _RATE_MULT)[prefix]
        bps = float(number) * mult * (8 if (unit or "bit").lower() == "bps" else 1)
    if not bps > 0 or bps != bps or bps == float("inf"):
        raise ValueError(f"rate must be positive and finite, got {rate!r}")
    return bps


def _check_probability(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 3600.0:
        raise ValueError(f"{name} must be a duration in seconds in [0, 3600), got {value!r}")


@dataclass(frozen=True)
class LinkSpec:
    """Impairments of one host's link to the bridge.

    Parameters
    ----------
    loss : float
        Probability that a packet is dropped, independently per packet and per direction it applies to. With the
        default ``direction="in"`` it is applied to packets entering the host, so in a gather to one root with loss
        on the root's link exactly a fraction ``loss`` of the datagrams is lost (in expectation). With nftables or
        iptables only IPv4/IPv6 packets are dropped (never ARP); netem drops any frame.
    rate : str or None
        Bandwidth of the link, a ``tc`` rate such as ``"10gbit"`` or ``"200mbit"`` (see :func:`parse_rate`).
        Emulated with ``tbf`` in *both* directions whatever ``direction`` says (a full-duplex link): on the host's
        veth (traffic the host sends) and on the bridge-side veth (traffic the host receives). Packets beyond
        :data:`TBF_LATENCY_SECONDS` of queue are dropped, as on a congested switch port.
    delay : float
        One-way delay in seconds added to each packet: ``tc netem`` where the kernel has ``sch_netem``, otherwise
        the NFQUEUE delay line at the host's ingress (:mod:`lossympi.netem.delayline`; direction ``"in"`` only).
    jitter : float
        Random variation of the delay in seconds, uniform in ``delay +- jitter`` as netem draws it.
    reorder : float
        Probability that a packet is sent immediately instead of being delayed, which reorders it (netem's
        ``reorder``; requires ``delay > 0``).
    duplicate : float
        Probability that a packet is duplicated (netem only).
    gemodel : tuple of 4 floats, optional
        Correlated (bursty) loss, the Gilbert-Elliott model of netem's ``loss gemodel p r 1-h 1-k``: a two-state
        Markov chain, good -> bad with probability ``p`` and bad -> good with ``r`` per packet, and a packet is
        lost with probability ``1-h`` in the bad state and ``1-k`` in the good one. The mean loss is
        ``(r (1-k) + p (1-h)) / (p + r)`` and a bad spell lasts ``1/r`` packets on average. Applied by netem, or by
        the delay line (drop verdicts at the host's ingress); ``loss`` stays independent per packet (nftables).
    jitter_reorders : bool
        With jitter, packets leave in the order of their delayed send time, so jitter reorders them (netem's
        behaviour, the default). ``False``: a packet is never released before the one ahead of it (the delay
        line; netem has no such mode, so the delay line is used even where ``sch_netem`` exists).
    queues : int
        Netfilter queues of the delay line (``iptables --queue-balance``, one thread each; flows are hashed to
        queues, so the order within a flow is kept).
    fail_open : bool
        When the delay line's kernel queue is full, let packets through undelayed instead of dropping them.
    direction : {"in", "out", "both"}
        Which packets ``loss``, ``delay``, ``jitter``, ``reorder`` and ``duplicate`` apply to: ``"in"`` packets
        entering the host (bridge -> host), ``"out"`` packets leaving it (host -> bridge), ``"both"`` each of them
        independently (so a packet between two hosts with ``loss=p`` on both links and ``direction="both"`` crosses
        four lossy hops).

    Raises
    ------
    ValueError
        A value is out of range, or ``reorder > 0`` with ``delay == 0``.
    """

    loss: float = 0.0
    rate: str | None = None
    delay: float = 0.0
    jitter: float = 0.0
    reorder: float = 0.0
    duplicate: float = 0.0
    direction: str = "in"
    gemodel: tuple[float, float, float, float] | None = None
    jitter_reorders: bool = True
    queues: int = 1
    fail_open: bool = False

    def __post_init__(self) -> None:
        _check_probability("loss", self.loss)
        _check_probability("reorder", self.reorder)
        _check_probability("duplicate", self.duplicate)
        _check_seconds("delay", self.delay)
        _check_seconds("jitter", self.jitter)
        if self.rate is not None:
            parse_rate(self.rate)
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.reorder > 0 and self.delay <= 0:
            raise ValueError("reorder needs delay > 0: netem reorders by sending some packets without the delay")
        if self.gemodel is not None:
            if isinstance(self.gemodel, str | bytes) or len(self.gemodel) != 4:
                raise ValueError(f"gemodel must be (p, r, 1-h, 1-k), got {self.gemodel!r}")
            for name, value in zip(("p", "r", "1-h", "1-k"), self.gemodel, strict=True):
                _check_probability(f"gemodel {name}", value)
            object.__setattr__(self, "gemodel", tuple(float(x) for x in self.gemodel))
        if isinstance(self.queues, bool) or not isinstance(self.queues, int) or not 1 <= self.queues <= 64:
            raise ValueError(f"queues must be an integer in [1, 64], got {self.queues!r}")

    @property
    def rate_bps(self) -> float | None:
        """The rate in bits per second, or None when unlimited."""
        return None if self.rate is None else parse_rate(self.rate)

    @property
    def directions(self) -> tuple[str, ...]:
        """``("in",)``, ``("out",)`` or ``("in", "out")``."""
        return ("in", "out") if self.direction == "both" else (self.direction,)

    def wanted(self) -> tuple[str, ...]:
        """The impairments this spec asks for (non-zero / non-None), in :data:`IMPAIRMENTS` order."""
        return tuple(name for name in IMPAIRMENTS if getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-friendly dict."""
        return dataclasses.asdict(self)
