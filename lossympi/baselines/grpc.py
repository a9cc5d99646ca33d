"""gRPC baseline: rank 0 serves two streaming RPCs of raw bytes (identity serializers, no protobuf).

Senders pull the parameters (``Params``: one request, a stream of replies) and push their gradients (``Push``: a
stream of requests, one reply), both in chunks of ``chunk_bytes`` (1 MiB by default), as a gRPC user moves
large arrays. The port is announced over the control star (:class:`~lossympi.baselines.star.Star`). The channel
is insecure (no TLS); every message is authenticated under a key of the sender's (derived from its pair key),
so neither side accepts a byte from anyone else:

- a stream opens with its rank, a frame header (kind, dtype, round, total bytes), its chunk size and a fresh
  random nonce, under an HMAC-SHA256;
- then come the chunks, each with its index and a Poly1305 tag under a one-time key: HMAC-SHA256 of the data
  key over (label, rank, round, nonce, index), so a chunk moved to another place, stream, round or rank fails.
  The receiver checks each chunk's index, size and tag before copying it straight into the row (or into
  ``theta``); a bad chunk refuses the whole gradient (its row is not delivered);
- a ``Params`` request carries the rank, the round and their HMAC-SHA256.

A gradient's size, dtype and round are checked before a byte reaches its row; a gradient of an earlier round,
or one that is still arriving when the gather's deadline passes, never lands in a row. Message-size limits are
set on both ends (``max_message_bytes``: one chunk and its prefix must fit). Nothing received is unpickled or
executed.

Poly1305 (``cryptography``, a dependency of lossympi) tags ≈ 8 GB/s per core, where HMAC-SHA256 (SHA
extensions) hashes ≈ 1.6 GB/s and hashlib's keyed BLAKE2b ≈ 0.75 GB/s (measured on the benchmark machine): with
HMAC-SHA256 over every chunk, hashing took more CPU than gRPC's own work on a 2-core machine.

:class:`GrpcRoot` is rank 0's end, :class:`GrpcSender` a sender's. Used by aggregathor's ``--transport grpc``
and by ``python -m lossympi.bench gather``. ``grpcio`` is imported when a set-up starts (it is not a
dependency of lossympi: ``pip install grpcio``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from lossympi.baselines.frames import HEADER, KIND_GRAD, KIND_PARAMS, BaselineError, Gathered, bytes_of, header, parse
from lossympi.baselines.star import Star

__all__ = ["CHUNK_PREFIX", "LABEL", "MIN_CHUNK", "SERVICE", "GrpcRoot", "GrpcSender", "import_grpc"]

log = logging.getLogger(__name__)

SERVICE = "lossympi.Baseline"
#: The label of the gRPC baseline's data keys.
LABEL = b"grpc-v2"
#: MAC labels: a Params request, the opening of a Push and of a Params reply, and their chunks.
_PARAMS = b"lossympi-baseline-grpc-params-v2"
_PUSH_OPEN = b"lossympi-baseline-grpc-push-open-v2"
_PUSH_CHUNK = b"lossympi-baseline-grpc-push-chunk-v2"
_REPLY_OPEN = b"lossympi-baseline-grpc-reply-open-v2"
_REPLY_CHUNK = b"lossympi-baseline-grpc-reply-chunk-v2"
_MAC = 32
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_NONCE = 16
_TAG = 16
_REQUEST = struct.Struct("<IQ")  # Params request: rank, round (then its MAC)
#: The opening of a stream (a Push's or a Params reply's): rank, frame header, chunk bytes, nonce (then its MAC).
_OPEN = struct.Struct(f"<I{HEADER.size}sI{_NONCE}s")
_SEAL = struct.Struct("<IQI")  # what a chunk's one-time key is derived over, with its label and nonce
#: A chunk message: Poly1305 tag, index, then the chunk's bytes.
_CHUNK = struct.Struct(f"<{_TAG}sI")
CHUNK_PREFIX = _CHUNK.size
#: The smallest chunk a stream may declare (a gradient or parameters smaller than it travel as one chunk).
MIN_CHUNK = 4096
_PUSH = (_PUSH_OPEN, _PUSH_CHUNK)
_REPLY = (_REPLY_OPEN, _REPLY_CHUNK)


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


def _check_sizes(chunk_bytes: int, max_message_bytes: int) -> None:
    if not MIN_CHUNK <= chunk_bytes <= max_message_bytes - CHUNK_PREFIX:
        raise ValueError(f"chunk_bytes={chunk_bytes} must be between {MIN_CHUNK} and max_message_bytes - "
                         f"{CHUNK_PREFIX} = {max_message_bytes - CHUNK_PREFIX}: lower chunk_bytes or raise "
                         "max_message_bytes")


# ---------------------------------------------------------------------------------------------------- the wire
def _mac(key: bytes, label: bytes, body: bytes) -> bytes:
    return hmac.digest(key, label + body, "sha256")


def _sealed(key: bytes, label: bytes, body: bytes) -> bytes:
    """``body`` followed by its MAC."""
    return body + _mac(key, label, body)


def _unseal(key: bytes | None, label: bytes, msg: bytes) -> bytes | None:
    """The body of a sealed message if its MAC is right under ``key``, else None."""
    body = msg[:-_MAC]
    if key is None or len(msg) < _MAC or not hmac.compare_digest(msg[-_MAC:], _mac(key, label, body)):
        return None
    return body


@dataclass(frozen=True)
class _Stream:
    """One stream's opening (authenticated under ``key``) and what its chunks' tags are bound to."""

    key: bytes
    label: bytes  # of its chunks
    rank: int
    kind: int
    dtype: np.dtype | None
    rnd: int
    nbytes: int
    chunk: int
    nonce: bytes

    def one_time_key(self, index: int) -> bytes:
        """The Poly1305 key of chunk ``index``: a PRF of the data key over (label, rank, round, nonce, index),
        so each key tags one chunk, and a chunk moved to another place, round, rank or stream fails."""
        return hmac.digest(self.key, self.label + _SEAL.pack(self.rank, self.rnd, index) + self.nonce, "sha256")

    def spans(self) -> Iterator[tuple[int, int, int]]:
        """``(index, offset, size)`` of each chunk."""
        for i, off in enumerate(range(0, self.nbytes, self.chunk)):
            yield i, off, min(self.chunk, self.nbytes - off)

    def messages(self, opening: bytes, view: memoryview) -> Iterator[bytes]:
        """``opening``, then each chunk of ``view`` behind its tag and index (tagged when asked for)."""
        yield opening
        for i, off, size in self.spans():
            part = view[off:off + size]
            yield b"".join((_CHUNK.pack(Poly1305.generate_tag(self.one_time_key(i), part), i), part))

    def chunk_of(self, index: int, size: int, msg: bytes | None) -> memoryview | None:
        """The ``size`` bytes of chunk ``index`` if ``msg`` is it, whole and authentic, else None."""
        if msg is None or len(msg) != CHUNK_PREFIX + size:
            return None
        tag, got = _CHUNK.unpack_from(msg)
        part = memoryview(msg)[CHUNK_PREFIX:]
        if got != index:
            return None
        try:
            Poly1305.verify_tag(self.one_time_key(index), part, tag)
        except InvalidSignature:
            return None
        return part


def _open(key: bytes, labels: tuple[bytes, bytes], rank: int, kind: int, dtype: Any, rnd: int,
          view: memoryview, chunk: int) -> Iterator[bytes]:
    """The messages of a new stream of ``view`` (``labels``: of its opening and of its chunks)."""
    s = _Stream(key, labels[1], rank, kind, np.dtype(dtype), rnd, len(view), chunk, os.urandom(_NONCE))
    opening = _sealed(key, labels[0], _OPEN.pack(rank, header(kind, dtype, rnd, len(view)), chunk, s.nonce))
    return s.messages(opening, view)


def _opened(keys: Any, labels: tuple[bytes, bytes], msg: bytes) -> _Stream | None:
    """The stream that ``msg`` opens if it is an authentic opening under ``keys(rank)``, else None."""
    if len(msg) != _OPEN.size + _MAC:
        return None
    rank, head, chunk, nonce = _OPEN.unpack_from(msg)
    key = keys(rank)
    if _unseal(key, labels[0], msg) is None:
        return None
    try:
        kind, dtype, rnd, nbytes = parse(head)
    except BaselineError:  # authentic but not a frame header: a bug or a Byzantine peer
        return None
    return _Stream(key, labels[1], rank, kind, dtype, rnd, nbytes, chunk, nonce)


class _Refused(Exception):
    """A call refused: its gRPC status code's name and the reason."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code


# ---------------------------------------------------------------------------------------------------- rank 0
@dataclass
class _Window:
    """Rank 0: the gradients of one round being gathered (guarded by the root's condition)."""

    rnd: int
    views: list[memoryview]
    t0: float
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event
    open: bool = True
    writers: int = 0  # chunks being copied into a row right now (outside the lock)
    got: dict[int, float] = field(default_factory=dict)
    busy: set[int] = field(default_factory=set)  # ranks whose gradient is arriving


class _GrpcStar(Star):
    """What both ends share: the control star under :data:`LABEL`'s data keys, the message and chunk sizes."""

    def __init__(self, world: Any, *, control_timeout: float, stall_timeout: float, max_message_bytes: int,
                 chunk_bytes: int) -> None:
        super().__init__(world, LABEL, control_timeout=control_timeout, stall_timeout=stall_timeout)
        _check_sizes(chunk_bytes, max_message_bytes)
        self.max_message_bytes = int(max_message_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self.port: int | None = None


class GrpcRoot(_GrpcStar):
    """Rank 0's end: the gRPC server of ``Params`` and ``Push``.

    Parameters are those of :class:`~lossympi.baselines.star.Star`, plus ``max_message_bytes``: the largest
    message either end accepts, and ``chunk_bytes``: the size of the parameters' chunks (one chunk and its
    :data:`CHUNK_PREFIX` must fit in a message; senders choose their gradients' own).
    """

    def __init__(self, world: Any, *, control_timeout: float = 120.0, stall_timeout: float = 60.0,
                 max_message_bytes: int = 4 << 20, chunk_bytes: int = 1 << 20) -> None:
        super().__init__(world, control_timeout=control_timeout, stall_timeout=stall_timeout,
                         max_message_bytes=max_message_bytes, chunk_bytes=chunk_bytes)
        self.rejected = 0  # calls refused (authentication, size, dtype, round, a bad chunk), all rounds
        # shared with the gRPC handler threads, under _cond
        self._cond = threading.Condition()
        self._published = -1
        self._params: tuple[np.dtype, memoryview] = (np.dtype("<f4"), memoryview(b""))  # a copy of theta
        self._expect: tuple[int, np.dtype, int] | None = None  # round, dtype, payload bytes of a gradient
        self._window: _Window | None = None
        self._closing = False
        self._server: Any = None
        self._pool: Any = None

    async def _setup(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        grpc = import_grpc()
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Params": grpc.unary_stream_rpc_method_handler(self._serve_params),
            "Push": grpc.stream_unary_rpc_method_handler(self._serve_push),
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
    def _refuse(self, context: Any, refused: _Refused) -> None:
        with self._cond:
            self.rejected += 1
        log.warning("grpc baseline: refused a call: %s", refused)
        context.abort(getattr(import_grpc().StatusCode, refused.code), str(refused))

    def _key(self, r: int) -> bytes | None:
        return self.keys.get(r) if 0 < r < self.size else None

    def _serve_params(self, request: bytes, context: Any) -> Iterator[bytes]:
        grpc = import_grpc()
        r, rnd = _REQUEST.unpack_from(request) if len(request) == _REQUEST.size + _MAC else (0, 0)
        if _unseal(self._key(r), _PARAMS, request) is None:
            self._refuse(context, _Refused("UNAUTHENTICATED", "a Params request failed authentication"))
        with self._cond:
            ok = self._cond.wait_for(lambda: self._closing or self._published >= rnd, self.stall_timeout)
            closing, published, (dtype, snap) = self._closing, self._published, self._params
        if closing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping")
        if not ok:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"round {rnd} was not published in time")
        if published != rnd:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"parameters of round {rnd} asked for while serving round {published}")
        return _open(self.keys[r], _REPLY, r, KIND_PARAMS, dtype, rnd, snap, self.chunk_bytes)

    def _serve_push(self, requests: Iterator[bytes], context: Any) -> bytes:
        grpc = import_grpc()
        try:
            push = self._opening(next(requests, b""))
            if push is None:
                return b"late"
            w = self._claim(push)
            if w is None:
                return b"late"
            try:
                return self._fill(w, push, requests)
            finally:
                with self._cond:
                    w.busy.discard(push.rank)
        except _Refused as refused:
            self._refuse(context, refused)
        except grpc.RpcError:  # the sender cancelled its call: its gradient is not delivered
            pass
        return b"cancelled"

    def _opening(self, msg: bytes) -> _Stream | None:
        """The Push that ``msg`` opens; None if its round is over; _Refused if it is not one we accept."""
        if len(msg) != _OPEN.size + _MAC:
            raise _Refused("INVALID_ARGUMENT", f"a Push opened with {len(msg)} bytes, not {_OPEN.size + _MAC}")
        s = _opened(self._key, _PUSH, msg)
        if s is None:
            raise _Refused("UNAUTHENTICATED", "a Push failed authentication")
        with self._cond:
            expect = self._expect
        if s.kind != KIND_GRAD or expect is None or s.rnd > expect[0]:
            raise _Refused("INVALID_ARGUMENT", f"rank {s.rank}: no gradient of round {s.rnd} is expected now")
        if s.rnd < expect[0]:
            return None
        if s.dtype != expect[1] or s.nbytes != expect[2]:
            raise _Refused("INVALID_ARGUMENT", f"rank {s.rank}: a gradient of {s.nbytes} bytes of {s.dtype}; "
                           f"expected {expect[2]} bytes of {expect[1]}")
        if not MIN_CHUNK <= s.chunk <= self.max_message_bytes - CHUNK_PREFIX:
            raise _Refused("INVALID_ARGUMENT", f"rank {s.rank}: chunks of {s.chunk} bytes (accepted: {MIN_CHUNK} "
                           f"to {self.max_message_bytes - CHUNK_PREFIX})")
        return s

    def _claim(self, push: _Stream) -> _Window | None:
        """The window of the push's round once its gather started, with the push's row claimed; None if the
        round is over, the row already arrived or is arriving from another call."""
        def ready() -> bool:
            w = self._window
            return (self._closing or self._expect is None or self._expect[0] != push.rnd
                    or (w is not None and w.rnd == push.rnd))

        with self._cond:
            self._cond.wait_for(ready, self.stall_timeout)
            w = self._window
            if (self._closing or w is None or w.rnd != push.rnd or not w.open or push.rank in w.got
                    or push.rank in w.busy):
                return None
            w.busy.add(push.rank)
            return w

    def _fill(self, w: _Window, push: _Stream, requests: Iterator[bytes]) -> bytes:
        """Check each chunk of the push and copy it into its row; b"ok" once whole (b"late" if the gather
        closed first)."""
        row = w.views[push.rank]
        for i, off, size in push.spans():
            part = push.chunk_of(i, size, next(requests, None))
            if part is None:
                raise _Refused("INVALID_ARGUMENT", f"rank {push.rank}: chunk {i} of its gradient of round "
                               f"{push.rnd} is missing, of the wrong size, out of order or not authentic")
            with self._cond:
                if not w.open:
                    return b"late"
                w.writers += 1
            try:
                row[off:off + size] = part
            finally:
                with self._cond:
                    w.writers -= 1
                    self._cond.notify_all()
        with self._cond:
            if not w.open:
                return b"late"
            w.got[push.rank] = time.monotonic() - w.t0
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
        snap = memoryview(bytes(view))  # theta may change while the workers pull
        with self._cond:
            self._params, self._published = (theta.dtype, snap), rnd
            self._cond.notify_all()
        self.expect(rnd, theta.dtype, view.nbytes)

    def expect(self, rnd: int, dtype: Any, nbytes: int) -> None:
        """Accept gradients of round ``rnd``: ``nbytes`` bytes of ``dtype`` (earlier rounds' are late now)."""
        with self._cond:
            self._expect = (rnd, np.dtype(dtype), int(nbytes))
            self._window = None
            self._cond.notify_all()

    async def gather(self, rows: np.ndarray, rnd: int, deadline: float) -> Gathered:
        """Gradients of round ``rnd`` (announced by :meth:`publish` or :meth:`expect`) into ``rows`` until
        ``deadline``; a row still arriving then is not delivered (and no byte of it lands after the return)."""
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
            views = [bytes_of(row) for row in rows]  # ValueError unless C-contiguous
            w = _Window(rnd, views, t0, asyncio.get_running_loop(), event)
            self._window = w
            self._cond.notify_all()
            rejected0 = self.rejected
        try:
            await asyncio.wait_for(event.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        finally:
            with self._cond:
                w.open = False
                self._cond.wait_for(lambda: w.writers == 0)  # a chunk being copied: microseconds
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


# ---------------------------------------------------------------------------------------------------- senders
class GrpcSender(_GrpcStar):
    """A sender's end: a channel to rank 0's server; pulls the parameters, pushes its gradients.

    Parameters are those of :class:`~lossympi.baselines.star.Star`, plus ``max_message_bytes`` (the largest
    message either end accepts) and ``chunk_bytes`` (the size of its gradients' chunks).
    """

    def __init__(self, world: Any, *, control_timeout: float = 120.0, stall_timeout: float = 60.0,
                 max_message_bytes: int = 4 << 20, chunk_bytes: int = 1 << 20) -> None:
        super().__init__(world, control_timeout=control_timeout, stall_timeout=stall_timeout,
                         max_message_bytes=max_message_bytes, chunk_bytes=chunk_bytes)
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
        self._params_rpc = self._channel.unary_stream(f"/{SERVICE}/Params")
        self._push_rpc = self._channel.stream_unary(f"/{SERVICE}/Push")

    def params_request(self, rnd: int) -> bytes:
        """The authenticated ``Params`` request of round ``rnd``."""
        return _sealed(self.keys[0], _PARAMS, _REQUEST.pack(self.rank, rnd))

    def push_messages(self, grad: np.ndarray, rnd: int) -> Iterator[bytes]:
        """The messages of the ``Push`` of ``grad`` as this sender's gradient of round ``rnd``: the opening,
        then the chunks (each MAC computed when its message is asked for)."""
        return _open(self.keys[0], _PUSH, self.rank, KIND_GRAD, grad.dtype, rnd, bytes_of(grad), self.chunk_bytes)

    async def pull(self, theta: np.ndarray, rnd: int) -> None:
        """Receive the parameters of round ``rnd`` into ``theta`` (every byte; ``stall_timeout`` bounds the call).
        Each chunk is checked before it is copied; on a BaselineError ``theta`` may hold some new chunks."""
        grpc = import_grpc()
        await self.connect()
        view = bytes_of(theta)
        call = self._params_rpc(self.params_request(rnd), timeout=self.stall_timeout)
        try:
            await asyncio.to_thread(self._read_params, call, view, theta.dtype, rnd)
        except grpc.RpcError as exc:
            raise BaselineError(f"rank {self.rank}: Params of round {rnd} failed: {exc}") from exc
        except asyncio.CancelledError:
            call.cancel()
            raise

    def _read_params(self, replies: Iterator[bytes], view: memoryview, dtype: np.dtype, rnd: int) -> None:
        """Copy the authenticated chunks of the parameters of round ``rnd`` into ``view`` (a thread's work)."""
        n = len(view)
        s = _opened(lambda r: self.keys[0] if r == self.rank else None, _REPLY, next(replies, b""))
        if s is None:
            raise BaselineError(f"rank {self.rank}: the parameters of round {rnd} failed authentication")
        if s.kind != KIND_PARAMS or s.rnd != rnd or s.dtype != dtype or s.nbytes != n or s.chunk < MIN_CHUNK:
            raise BaselineError(f"rank {self.rank}: expected the parameters of round {rnd} ({n} bytes of {dtype}), "
                                f"got kind {s.kind}, round {s.rnd}, {s.nbytes} bytes of {s.dtype} in chunks of "
                                f"{s.chunk}")
        for i, off, k in s.spans():
            part = s.chunk_of(i, k, next(replies, None))
            if part is None:
                raise BaselineError(f"rank {self.rank}: chunk {i} of the parameters of round {rnd} is missing, "
                                    "of the wrong size, out of order or not authentic")
            view[off:off + k] = part

    async def push(self, grad: np.ndarray, rnd: int) -> None:
        """Send ``grad`` as this sender's gradient of round ``rnd``; returns once rank 0 answered."""
        grpc = import_grpc()
        await self.connect()
        try:
            await _aio(self._push_rpc.future(self.push_messages(grad, rnd), timeout=self.stall_timeout))
        except grpc.RpcError as exc:
            raise BaselineError(f"rank {self.rank}: Push of round {rnd} failed: {exc}") from exc

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        super().close()
