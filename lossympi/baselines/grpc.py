"""gRPC baseline: rank 0 serves two unary RPCs of raw bytes (identity serializers, no protobuf).

Senders pull the parameters (``Params``) and push their gradients (``Push``, one frame: header and payload).
The port is announced over the control star (:class:`~lossympi.baselines.star.Star`). The channel is insecure
(no TLS); every call carries the caller's rank and an HMAC-SHA256 under its data key over the whole request, and
every ``Params`` reply a MAC over the reply's digest, so neither side accepts bytes from anyone else. A
gradient's size, dtype and round are checked, and its MAC, before a byte reaches its row. Message-size limits
are set on both ends (``max_message_bytes``).

:class:`GrpcRoot` is rank 0's end, :class:`GrpcSender` a sender's. Used by aggregathor's ``--transport grpc``
and by ``python -m lossympi.bench gather``. ``grpcio`` is imported when a set-up starts (it is not a
dependency of lossympi: ``pip install grpcio``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lossympi.baselines.frames import HEADER, KIND_GRAD, KIND_PARAMS, BaselineError, Gathered, bytes_of, header, parse
from lossympi.baselines.star import Star

__all__ = ["LABEL", "PARAMS", "PUSH", "SERVICE", "GrpcRoot", "GrpcSender", "import_grpc"]

log = logging.getLogger(__name__)

SERVICE = "lossympi.Baseline"
#: The label of the gRPC baseline's data keys.
LABEL = b"grpc-v1"
#: MAC labels of the two calls' requests.
PARAMS = b"lossympi-baseline-grpc-params-v1"
PUSH = b"lossympi-baseline-grpc-push-v1"
_REPLY = b"lossympi-baseline-grpc-reply-v1"
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def import_grpc() -> Any:
    """The ``grpc`` module, or a BaselineError that says how to install it."""
    try:
        import grpc
    except ImportError:
        raise BaselineError("the gRPC baseline needs grpcio, which is not installed: pip install grpcio") from None
    return grpc


def _aio(call: Any) -> asyncio.Future:
    """An asyncio future settled by a ``grpc.Future`` (completed on a gRPC thread)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle() -> None:
        if fut.done():
            return
        if call.cancelled():
            fut.cancel()
            return
        exc = call.exception()
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(call.result())

    def done(_: Any) -> None:
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: nobody waits any more
            pass

    call.add_done_callback(done)
    fut.add_done_callback(lambda f: call.cancel() if f.cancelled() else None)
    return fut


def _options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes), ("grpc.enable_http_proxy", 0)]


def _mac(key: bytes, label: bytes, rank: int, request: bytes) -> bytes:
    h = hmac.new(key, label + _U32.pack(rank), hashlib.sha256)
    h.update(request)  # streamed: the request (a whole gradient) is not copied
    return h.digest()


@dataclass
class _Window:
    """Rank 0: the gradients of one round being gathered (guarded by the root's condition)."""

    rnd: int
    rows: np.ndarray
    t0: float
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event
    open: bool = True
    got: dict[int, float] = field(default_factory=dict)


class GrpcRoot(Star):
    """Rank 0's end: the gRPC server of ``Params`` and ``Push``.

    Parameters are those of :class:`~lossympi.baselines.star.Star`, plus ``max_message_bytes``: the largest
    message either end accepts (a frame header plus the parameters or one gradient must fit).
    """

    def __init__(self, world: Any, *, control_timeout: float = 120.0, stall_timeout: float = 60.0,
                 max_message_bytes: int = 256 << 20) -> None:
        super().__init__(world, LABEL, control_timeout=control_timeout, stall_timeout=stall_timeout)
        self.max_message_bytes = int(max_message_bytes)
        self.port: int | None = None
        self.rejected = 0  # calls refused (authentication, size, dtype, round), all rounds
        # shared with the gRPC handler threads, under _cond
        self._cond = threading.Condition()
        self._published = -1
        self._snapshot = b""
        self._digest = b""
        self._expect: tuple[int, np.dtype, int] | None = None  # round, dtype, payload bytes of a gradient
        self._window: _Window | None = None
        self._early: dict[int, bytes] = {}
        self._closing = False
        self._server: Any = None
        self._pool: Any = None

    async def _setup(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        grpc = import_grpc()
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Params": grpc.unary_unary_rpc_method_handler(self._serve_params),
            "Push": grpc.unary_unary_rpc_method_handler(self._serve_push),
        })
        self._pool = ThreadPoolExecutor(max_workers=2 * self.size + 4, thread_name_prefix="lossympi-grpc")
        server = grpc.server(self._pool, handlers=[handler], options=_options(self.max_message_bytes))
        try:
            port = server.add_insecure_port(f"{self.host}:0")
        except RuntimeError as exc:
            raise BaselineError(f"grpc baseline: cannot listen on {self.host}: {exc}") from exc
        if not port:
            raise BaselineError(f"grpc baseline: cannot listen on {self.host}")
        server.start()
        self._server = server
        self.port = int(port)
        await self.control.bcast_bytes(_U16.pack(self.port))

    # ------------------------------------------------------------------ handlers (gRPC threads)
    def _refuse(self, context: Any, code: Any, msg: str) -> None:
        with self._cond:
            self.rejected += 1
        log.warning("grpc baseline: refused a call: %s", msg)
        context.abort(code, msg)

    def _caller(self, context: Any, label: bytes, request: bytes) -> int:
        """The authenticated rank of a call (aborts the call otherwise)."""
        grpc = import_grpc()
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        try:
            r = int(md.get("lm-rank", ""))
            mac = bytes.fromhex(md.get("lm-mac", ""))
        except ValueError:
            r, mac = -1, b""
        key = self.keys.get(r) if 0 < r < self.size else None
        if key is not None and hmac.compare_digest(mac, _mac(key, label, r, request)):
            return r
        self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "the call failed authentication")
        raise AssertionError("unreachable")  # context.abort raises

    def _serve_params(self, request: bytes, context: Any) -> bytes:
        grpc = import_grpc()
        r = self._caller(context, PARAMS, request)
        if len(request) != _U64.size:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed parameter request")
        (rnd,) = _U64.unpack(request)
        with self._cond:
            ok = self._cond.wait_for(lambda: self._closing or self._published >= rnd, self.stall_timeout)
            closing, published, snap, digest = self._closing, self._published, self._snapshot, self._digest
        if closing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping")
        if not ok:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"round {rnd} was not published in time")
        if published != rnd:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"parameters of round {rnd} asked for while serving round {published}")
        mac = hmac.new(self.keys[r], _REPLY + _U32.pack(r) + digest, hashlib.sha256).hexdigest()
        context.set_trailing_metadata((("lm-mac", mac),))
        return snap

    def _serve_push(self, request: bytes, context: Any) -> bytes:
        grpc = import_grpc()
        r = self._caller(context, PUSH, request)
        try:
            kind, dtype, rnd, size = parse(request)
        except BaselineError as exc:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._cond:
            expect = self._expect
            if kind != KIND_GRAD or expect is None or rnd > expect[0]:
                self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"rank {r}: no gradient of round {rnd} "
                             "is expected now")
            assert expect is not None
            if rnd < expect[0]:
                return b"late"
            if dtype != expect[1] or size != expect[2] or len(request) != HEADER.size + size:
                self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"rank {r}: gradient of {len(request) - HEADER.size} bytes of {dtype} (header says "
                             f"{size}); expected {expect[2]} bytes of {expect[1]}")
            return self._take(r, rnd, request, expect[1])

    def _take(self, r: int, rnd: int, request: bytes, dtype: np.dtype) -> bytes:
        """Put an accepted gradient in its row (or keep it until the gather of its round starts); under _cond."""
        w = self._window
        if w is None or w.rnd != rnd:  # rank 0 has not started gathering this round yet: keep it
            self._early.setdefault(r, request)
            return b"ok"
        if not w.open or r in w.got:
            return b"late"
        w.rows[r] = np.frombuffer(request, dtype, offset=HEADER.size)
        w.got[r] = time.monotonic() - w.t0
        if len(w.got) == self.size - 1:
            try:
                w.loop.call_soon_threadsafe(w.event.set)
            except RuntimeError:
                pass
        return b"ok"

    # ------------------------------------------------------------------ the exchanges
    async def publish(self, theta: np.ndarray, rnd: int) -> None:
        """Serve ``theta`` as the parameters of round ``rnd``, and accept gradients of its size and dtype for it."""
        await self.connect()
        view = bytes_of(theta)
        snap = b"".join((header(KIND_PARAMS, theta.dtype, rnd, view.nbytes), view))
        digest = hashlib.sha256(snap).digest()
        with self._cond:
            self._snapshot, self._digest, self._published = snap, digest, rnd
            self._cond.notify_all()
        self.expect(rnd, theta.dtype, view.nbytes)

    def expect(self, rnd: int, dtype: Any, nbytes: int) -> None:
        """Accept gradients of round ``rnd``: ``nbytes`` bytes of ``dtype`` (earlier rounds' are late now)."""
        with self._cond:
            self._expect = (rnd, np.dtype(dtype), int(nbytes))
            self._window = None
            self._early.clear()

    async def gather(self, rows: np.ndarray, rnd: int, deadline: float) -> Gathered:
        """Gradients of round ``rnd`` (announced by :meth:`publish` or :meth:`expect`) into ``rows`` until
        ``deadline``."""
        await self.connect()
        t0 = time.monotonic()
        event = asyncio.Event()
        with self._cond:
            expect = self._expect
            if expect is None or expect[0] != rnd:
                raise BaselineError(f"gather of round {rnd} before publish() or expect() of that round")
            if rows.shape[0] != self.size or rows.dtype != expect[1] or rows[0].nbytes != expect[2]:
                raise ValueError(f"rows must be ({self.size}, d) of {expect[1]} like the parameters, got "
                                 f"{rows.shape} of {rows.dtype}")
            if not rows.flags.c_contiguous:
                raise ValueError("rows must be C-contiguous")
            w = _Window(rnd, rows, t0, asyncio.get_running_loop(), event)
            for r, request in self._early.items():
                rows[r] = np.frombuffer(request, expect[1], offset=HEADER.size)
                w.got[r] = 0.0
            self._early.clear()
            self._window = w
            rejected0 = self.rejected
            if len(w.got) == self.size - 1:
                event.set()
        try:
            await asyncio.wait_for(event.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        with self._cond:
            w.open = False
            got = dict(w.got)
            rejected = self.rejected - rejected0
        delivered = np.zeros(self.size - 1)
        for r in got:
            delivered[r - 1] = 1.0
        return Gathered(delivered, time.monotonic() - t0, sorted(got.values()), rejected)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.stop(None)
            self._server = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()


class GrpcSender(Star):
    """A sender's end: a channel to rank 0's server; pulls the parameters, pushes its gradients."""

    def __init__(self, world: Any, *, control_timeout: float = 120.0, stall_timeout: float = 60.0,
                 max_message_bytes: int = 256 << 20) -> None:
        super().__init__(world, LABEL, control_timeout=control_timeout, stall_timeout=stall_timeout)
        self.max_message_bytes = int(max_message_bytes)
        self.port: int | None = None
        self._channel: Any = None
        self._params_rpc: Any = None
        self._push_rpc: Any = None

    async def _setup(self) -> None:
        grpc = import_grpc()
        data = await self.control.bcast_bytes(None)
        if len(data) != _U16.size:
            raise BaselineError("rank 0 announced a malformed gRPC port")
        (self.port,) = _U16.unpack(data)
        self._channel = grpc.insecure_channel(f"{self.host}:{self.port}", options=_options(self.max_message_bytes))
        try:
            await asyncio.wait_for(_aio(grpc.channel_ready_future(self._channel)), self.control_timeout)
        except TimeoutError:
            raise BaselineError(f"rank {self.rank}: rank 0's gRPC server at {self.host}:{self.port} is not "
                                f"reachable within {self.control_timeout} s") from None
        self._params_rpc = self._channel.unary_unary(f"/{SERVICE}/Params")
        self._push_rpc = self._channel.unary_unary(f"/{SERVICE}/Push")

    def metadata(self, label: bytes, request: bytes) -> tuple[tuple[str, str], ...]:
        """The call metadata that authenticates ``request`` (a call labelled ``label``) as this rank's."""
        return (("lm-rank", str(self.rank)), ("lm-mac", _mac(self.keys[0], label, self.rank, request).hex()))

    async def pull(self, theta: np.ndarray, rnd: int) -> None:
        """Receive the parameters of round ``rnd`` into ``theta`` (every byte; ``stall_timeout`` bounds the call)."""
        grpc = import_grpc()
        await self.connect()
        view = bytes_of(theta)
        request = _U64.pack(rnd)
        call = self._params_rpc.future(request, metadata=self.metadata(PARAMS, request), timeout=self.stall_timeout)
        try:
            reply = await _aio(call)
        except grpc.RpcError as exc:
            raise BaselineError(f"rank {self.rank}: Params of round {rnd} failed: {exc}") from exc
        trailing = {k: v for k, v in (call.trailing_metadata() or ()) if isinstance(v, str)}
        digest = hashlib.sha256(reply).digest()
        expect = hmac.new(self.keys[0], _REPLY + _U32.pack(self.rank) + digest, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(trailing.get("lm-mac", ""), expect):
            raise BaselineError(f"rank {self.rank}: the parameters of round {rnd} failed authentication")
        kind, dtype, got, size = parse(reply)
        if (kind != KIND_PARAMS or got != rnd or dtype != theta.dtype or size != view.nbytes
                or len(reply) != HEADER.size + size):
            raise BaselineError(f"rank {self.rank}: expected the parameters of round {rnd} ({view.nbytes} bytes of "
                                f"{theta.dtype}), got kind {kind}, round {got}, {size} bytes of {dtype}")
        theta.reshape(-1)[...] = np.frombuffer(reply, theta.dtype, offset=HEADER.size)

    async def push(self, grad: np.ndarray, rnd: int) -> None:
        """Send ``grad`` as this sender's gradient of round ``rnd``; returns once rank 0 answered."""
        grpc = import_grpc()
        await self.connect()
        view = bytes_of(grad)
        request = b"".join((header(KIND_GRAD, grad.dtype, rnd, view.nbytes), view))
        try:
            await _aio(self._push_rpc.future(request, metadata=self.metadata(PUSH, request),
                                             timeout=self.stall_timeout))
        except grpc.RpcError as exc:
            raise BaselineError(f"rank {self.rank}: Push of round {rnd} failed: {exc}") from exc

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        super().close()
