"""The NFQUEUE delay line: delay, jitter, reordering and Gilbert-Elliott loss on kernels without ``sch_netem``.

A host's namespace sends what it receives on ``eth0`` to a netfilter queue (``iptables-legacy -I INPUT -i eth0
-j NFQUEUE --queue-num 0``; nftables' ``queue`` expression is often not built in). This process, started in the
same namespace, binds the queue in copy mode "meta" (only packet ids travel, never the payload) and holds each
packet's verdict until it is due (the hot loop is :class:`lossympi._nfqueue.DelayLine`, in C without the GIL).

The delay sits at the *receiving* host's ingress, where a wire's delay shows: held on the sender's egress, the
packets would still count against the sending socket (TCP Small Queues) and TCP would crawl (about 9 Mbit/s).

Saturation is reported, never silent: the kernel counts packets it dropped because the queue was full
(``queue_dropped``) or because this process's socket overflowed (``user_dropped``, seen here as ``ENOBUFS``), in
``/proc/net/netfilter/nfnetlink_queue`` of the namespace; the first time either grows, one warning line goes to
stderr, and a summary line at exit. With ``fail_open`` the kernel lets packets through undelayed instead of
dropping them when the queue is full.

Run as ``python -m lossympi.netem.delayline --queue 0 --delay 0.005 ...`` (root, inside the namespace); it prints
``ready`` on stdout once bound, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__: list[str] = []

NETLINK_NETFILTER = 12
_SO_RCVBUFFORCE = 33
_SO_TIMESTAMPNS = 35
_NFQNL_MSG_CONFIG = (3 << 8) | 2
_NFQA_CFG_CMD, _NFQA_CFG_PARAMS, _NFQA_CFG_QUEUE_MAXLEN, _NFQA_CFG_MASK, _NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
_CMD_BIND = 1
_COPY_META = 1
_F_FAIL_OPEN, _F_GSO = 1, 4
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_NLMSG_ERROR = 2
PROC_QUEUES = "/proc/net/netfilter/nfnetlink_queue"
QUEUE_MAXLEN = 1 << 17
"""Packets the kernel queue holds (and the line with it): 10 Gbit/s of 1500-byte frames for 150 ms."""
RCVBUF_BYTES = 64 << 20
"""The netlink socket's receive buffer (SO_RCVBUFFORCE), so that bursts do not overflow it."""


@dataclass(frozen=True)
class LineParams:
    """What one host's delay line does (seconds, probabilities); see :class:`lossympi.netem.LinkSpec`."""

    delay: float = 0.0
    jitter: float = 0.0
    jitter_reorders: bool = True
    reorder: float = 0.0
    gemodel: tuple[float, float, float, float] | None = None
    queues: int = 1
    fail_open: bool = False

    def argv(self) -> list[str]:
        """Command-line arguments of :func:`main` carrying these parameters."""
        out = ["--delay", repr(self.delay), "--jitter", repr(self.jitter), "--reorder", repr(self.reorder),
               "--queues", str(self.queues)]
        if not self.jitter_reorders:
            out.append("--keep-order")
        if self.gemodel is not None:
            out += ["--gemodel", ",".join(repr(float(x)) for x in self.gemodel)]
        if self.fail_open:
            out.append("--fail-open")
        return out


def _nla(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _config_message(queue: int, maxlen: int, fail_open: bool, seq: int = 1) -> bytes:
    """One NFQNL_MSG_CONFIG binding ``queue`` in copy mode "meta", with its length and flags (acknowledged)."""
    flags = _F_GSO | (_F_FAIL_OPEN if fail_open else 0)
    body = (struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue))
            + _nla(_NFQA_CFG_CMD, struct.pack("!BxH", _CMD_BIND, socket.AF_INET))
            + _nla(_NFQA_CFG_PARAMS, struct.pack("!IB", 0, _COPY_META))
            + _nla(_NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
            + _nla(_NFQA_CFG_MASK, struct.pack("!I", _F_FAIL_OPEN | _F_GSO))
            + _nla(_NFQA_CFG_FLAGS, struct.pack("!I", flags)))
    return struct.pack("=IHHII", 16 + len(body), _NFQNL_MSG_CONFIG, _NLM_F_REQUEST | _NLM_F_ACK, seq, 0) + body


def open_queue(queue: int, *, maxlen: int = QUEUE_MAXLEN, fail_open: bool = False) -> socket.socket:
    """A netlink socket bound to netfilter queue ``queue`` of this namespace (copy mode "meta").

    Raises
    ------
    OSError
        The kernel refused (e.g. EPERM without CAP_NET_ADMIN, EBUSY when another process has the queue).
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RCVBUF_BYTES)
        sock.send(_config_message(queue, maxlen, fail_open))
        sock.settimeout(5.0)
        reply = sock.recv(4096)
        sock.settimeout(None)
        kind = struct.unpack_from("=H", reply, 4)[0]
        error = struct.unpack_from("=i", reply, 16)[0] if kind == _NLMSG_ERROR and len(reply) >= 20 else 0
        if error:
            raise OSError(-error, f"binding netfilter queue {queue}: {os.strerror(-error)}")
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def read_queue_stats(path: str = PROC_QUEUES) -> dict[int, dict[str, int]]:
    """The kernel's counters of this namespace's netfilter queues: queue -> ``queue_total`` (held now),
    ``queue_dropped`` (dropped: the queue was full), ``user_dropped`` (dropped: the socket overflowed),
    ``id_sequence`` (packets queued so far)."""
    text = ""
    with contextlib.suppress(OSError), open(path, encoding="ascii") as fh:
        text = fh.read()
    return parse_queue_stats(text)


def parse_queue_stats(text: str) -> dict[int, dict[str, int]]:
    """Parse the text of ``/proc/net/netfilter/nfnetlink_queue`` (see :func:`read_queue_stats`)."""
    out: dict[int, dict[str, int]] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 8:
            out[int(f[0])] = {"queue_total": int(f[2]), "queue_dropped": int(f[5]), "user_dropped": int(f[6]),
                              "id_sequence": int(f[7])}
    return out


def _saturation(stats: dict[int, dict[str, int]], queues: Sequence[int]) -> tuple[int, int]:
    dropped = sum(stats.get(q, {}).get("queue_dropped", 0) for q in queues)
    user = sum(stats.get(q, {}).get("user_dropped", 0) for q in queues)
    return dropped, user


def _warn(line: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _serve(lines: list[Any], stop: threading.Event) -> list[BaseException]:
    """Run every line (one thread each beyond the first) until ``stop``; the errors raised."""
    errors: list[BaseException] = []

    def loop(line: Any) -> None:
        try:
            while not stop.is_set():
                line.run(0.1)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=loop, args=(line,), daemon=True) for line in lines[1:]]
    for t in threads:
        t.start()
    loop(lines[0])
    for t in threads:
        t.join()
    return errors


def _watch(tag: str, queues: Sequence[int], stop: threading.Event, base: tuple[int, int]) -> None:
    """Print one warning line the first time the kernel drops packets of these queues."""
    while not stop.wait(1.0):
        dropped, user = _saturation(read_queue_stats(), queues)
        if (dropped, user) != base:
            _warn(f"lossympi.netem delay line ({tag}): saturated: the kernel dropped {dropped - base[0]} packets "
                  f"(queue full) and {user - base[1]} (socket overflow, ENOBUFS) so far; a summary follows at exit")
            return


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lossympi.netem.delayline", description=__doc__.splitlines()[0])
    p.add_argument("--queue", type=int, default=0, help="first queue number (default 0)")
    p.add_argument("--queues", type=int, default=1, help="queues served, one thread each (iptables --queue-balance)")
    p.add_argument("--delay", type=float, default=0.0, help="one-way delay, seconds")
    p.add_argument("--jitter", type=float, default=0.0, help="uniform delay variation, seconds")
    p.add_argument("--keep-order", action="store_true", help="jitter never releases a packet before the one ahead")
    p.add_argument("--reorder", type=float, default=0.0, help="netem's reorder: probability of passing at once")
    p.add_argument("--gemodel", default=None, help="Gilbert-Elliott loss p,r,1-h,1-k (as netem's loss gemodel)")
    p.add_argument("--fail-open", action="store_true", help="when the queue is full, pass packets undelayed")
    p.add_argument("--seed", type=int, default=None, help="generator seed (default: random)")
    p.add_argument("--tag", default=None, help="name in warnings (default: the namespace's queue numbers)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Bind the queues, print ``ready``, serve until SIGTERM/SIGINT, print a summary line if packets were lost."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    from lossympi._nfqueue import DelayLine  # the compiled hot loop

    queues = list(range(args.queue, args.queue + args.queues))
    tag = args.tag or (f"queues {queues[0]}-{queues[-1]}" if len(queues) > 1 else f"queue {queues[0]}")
    gemodel = tuple(float(x) for x in args.gemodel.split(",")) if args.gemodel else None
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(8), "little")
    stamps = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # kept open: the kernel stamps what it receives
    with contextlib.suppress(OSError):  # (NFQA_TIMESTAMP), so the delay counts from the packet's arrival
        stamps.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    try:
        socks = [open_queue(q, fail_open=args.fail_open) for q in queues]
        lines = [DelayLine(s.fileno(), q, args.delay, args.jitter, not args.keep_order, args.reorder, gemodel,
                           QUEUE_MAXLEN, seed + k) for k, (s, q) in enumerate(zip(socks, queues, strict=True))]
    except (OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", flush=True)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    base = _saturation(read_queue_stats(), queues)
    threading.Thread(target=_watch, args=(tag, queues, stop, base), daemon=True).start()
    print("ready", flush=True)
    started = time.monotonic()
    errors = _serve(lines, stop)
    totals: dict[str, int] = {}
    for line in lines:
        for key, value in line.stats().items():
            totals[key] = totals.get(key, 0) + int(value)
    dropped, user = _saturation(read_queue_stats(), queues)
    lost = (dropped - base[0], user - base[1])
    if any(lost) or totals["overflow"] or totals["nl_errors"]:
        _warn(f"lossympi.netem delay line ({tag}): {totals['received']} packets in "
              f"{time.monotonic() - started:.1f} s; lost by saturation: {lost[0]} (queue full), {lost[1]} (socket "
              f"overflow, {totals['enobufs']} ENOBUFS); passed undelayed: {totals['overflow']} (line full); "
              f"verdicts refused: {totals['nl_errors']}")
    for exc in errors:
        _warn(f"lossympi.netem delay line ({tag}): {exc}")
    for s in socks:
        s.close()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
