"""Tests of lossympi.keys and lossympi.bootstrap (local, env:// rendezvous, MPI)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("cryptography", reason="lossympi.keys needs the 'cryptography' package (X25519)")

from lossympi import bootstrap  # noqa: E402
from lossympi.bootstrap import (  # noqa: E402
    RendezvousAuthError,
    RendezvousError,
    World,
    bind_udp,
    framing,
    from_env,
    init,
    local_worlds,
    messages,
)
from lossympi.bootstrap import env as bootstrap_env  # noqa: E402
from lossympi.keys import KeyPair, derive_pair_keys, hash_secret, job_secret_from_env, pair_key  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RankThread(threading.Thread):
    """Run ``from_env(**kw)`` in a thread; keep the World or the exception."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(daemon=True)
        self.kw = kw
        self.world: World | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.world = from_env(**self.kw)
        except BaseException as exc:  # reported to the test by result()
            self.error = exc

    def result(self, timeout: float = 20.0) -> World:
        self.join(timeout)
        assert not self.is_alive(), f"rank {self.kw.get('rank')} did not finish"
        if self.error is not None:
            raise self.error
        assert self.world is not None
        return self.world


def env_kw(rank: int, size: int, port: int, secret: str = "test-secret", **kw: Any) -> dict[str, Any]:
    base = {
        "rank": rank,
        "world_size": size,
        "rendezvous": f"127.0.0.1:{port}",
        "secret": secret,
        "timeout": 15.0,
        "environ": {},
    }
    base.update(kw)
    return base


def check_world_consistency(worlds: list[World]) -> None:
    size = len(worlds)
    for r, w in enumerate(worlds):
        assert w.rank == r and w.size == size
        assert w.addresses == worlds[0].addresses
        assert w.sock.getsockname() == w.addresses[r]
        assert w.sock.gettimeout() == 0.0  # non-blocking
        assert w.sock.family == socket.AF_INET and w.sock.type == socket.SOCK_DGRAM
        assert sorted(w.keys) == [j for j in range(size) if j != r]
        assert all(len(k) == 32 for k in w.keys.values())
    for i in range(size):
        for j in range(size):
            if i != j:
                assert worlds[i].keys[j] == worlds[j].keys[i]
    all_keys = {worlds[i].keys[j] for i in range(size) for j in range(size) if i < j}
    assert len(all_keys) == size * (size - 1) // 2
    assert len(set(worlds[0].addresses)) == size


def close_all(worlds: list[World]) -> None:
    for w in worlds:
        w.close()


# ------------------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------------------


def test_pair_key_symmetric_distinct_and_specified() -> None:
    s = b"\x01" * 32
    k = pair_key(s, 2, 5)
    assert len(k) == 32
    assert k == pair_key(s, 5, 2)
    expected = hashlib.blake2b(
        s, digest_size=32, person=b"lossympi-pair", salt=struct.pack("<II", 2, 5) + bytes(8)
    ).digest()
    assert k == expected
    assert len({pair_key(s, 0, 1), pair_key(s, 0, 2), pair_key(s, 1, 2), pair_key(s, 2, 5)}) == 4
    assert pair_key(b"\x02" * 32, 2, 5) != k
    with pytest.raises(ValueError, match="distinct"):
        pair_key(s, 3, 3)
    with pytest.raises(ValueError):
        pair_key(s, -1, 3)
    with pytest.raises(ValueError, match="empty"):
        pair_key(b"", 0, 1)


def test_x25519_exchange_and_pair_keys() -> None:
    a, b, c = KeyPair(), KeyPair(), KeyPair()
    assert len(a.public_bytes) == 32
    assert a.exchange(b.public_bytes) == b.exchange(a.public_bytes)
    assert c.exchange(a.public_bytes) != a.exchange(b.public_bytes)
    assert c.exchange(b.public_bytes) != a.exchange(b.public_bytes)
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        a.exchange(b.public_bytes[:31])
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        a.exchange(b.public_bytes + b"\0")
    with pytest.raises(ValueError, match="degenerate"):
        a.exchange(bytes(32))  # low-order point
    assert "public=" in repr(a)

    publics = {0: a.public_bytes, 1: b.public_bytes, 2: c.public_bytes}
    ka = derive_pair_keys(0, a, publics)
    kb = derive_pair_keys(1, b, publics)
    kc = derive_pair_keys(2, c, publics)
    assert sorted(ka) == [1, 2] and sorted(kb) == [0, 2] and sorted(kc) == [0, 1]
    assert ka[1] == kb[0] and ka[2] == kc[0] and kb[2] == kc[1]
    # the third rank cannot compute the (0, 1) key from what it knows
    assert ka[1] not in (kc[0], kc[1], pair_key(c.exchange(a.public_bytes), 0, 1))
    assert ka[1] != pair_key(c.exchange(b.public_bytes), 0, 1)
    with pytest.raises(ValueError, match="not this rank's key"):
        derive_pair_keys(0, a, {0: c.public_bytes, 1: b.public_bytes})
    with pytest.raises(ValueError, match="same public key"):
        derive_pair_keys(0, a, {0: a.public_bytes, 1: b.public_bytes, 2: b.public_bytes})


def test_job_secret_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOSSYMPI_SECRET", raising=False)
    assert job_secret_from_env() is None
    assert job_secret_from_env({"LOSSYMPI_SECRET": ""}) is None
    monkeypatch.setenv("LOSSYMPI_SECRET", "hunter2")
    s1 = job_secret_from_env()
    assert s1 is not None and len(s1) == 32
    assert s1 == job_secret_from_env({"LOSSYMPI_SECRET": "hunter2"})
    assert s1 != job_secret_from_env({"LOSSYMPI_SECRET": "hunter3"})


# ------------------------------------------------------------------------------------------------------
# local worlds, sockets
# ------------------------------------------------------------------------------------------------------


def test_local_worlds() -> None:
    worlds = local_worlds(4)
    try:
        check_world_consistency(worlds)
        assert worlds[0].info["method"] == "local"
        assert "keys" not in repr(worlds[0])  # keys never end up in logs through repr
        worlds[0].sock.sendto(b"ping", worlds[2].addresses[2])
        deadline = time.monotonic() + 5
        while True:
            try:
                data, src = worlds[2].sock.recvfrom(64)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline
                time.sleep(0.001)
        assert data == b"ping" and src == worlds[0].address
    finally:
        close_all(worlds)
    with pytest.raises(ValueError):
        local_worlds(0)
    w = init("local")
    assert w.size == 1 and w.rank == 0 and w.keys == {}
    w.close()


def test_bind_udp_port_range() -> None:
    port = free_udp_port()
    sock = bind_udp("127.0.0.1", (port, port))
    try:
        assert sock.getsockname() == ("127.0.0.1", port)
        assert sock.gettimeout() == 0.0
        with pytest.raises(OSError, match="no free UDP port"):
            bind_udp("127.0.0.1", (port, port))
    finally:
        sock.close()
    with pytest.raises(ValueError, match="port_range"):
        bind_udp("127.0.0.1", (10, 5))


# ------------------------------------------------------------------------------------------------------
# env:// rendezvous
# ------------------------------------------------------------------------------------------------------


def test_from_env_four_ranks() -> None:
    port = free_tcp_port()
    threads = [RankThread(**env_kw(r, 4, port)) for r in (3, 1, 2, 0)]  # start order does not matter
    for t in threads:
        t.start()
        time.sleep(0.01)
    worlds = sorted((t.result() for t in threads), key=lambda w: w.rank)
    try:
        check_world_consistency(worlds)
        assert all(w.info["method"] == "env" for w in worlds)
        assert worlds[0].info["rejected"] == {}
        assert all(a[0] == "127.0.0.1" for a in worlds[0].addresses)
    finally:
        close_all(worlds)


def test_from_env_world_of_one() -> None:
    w = from_env(**env_kw(0, 1, free_tcp_port()))
    assert w.size == 1 and w.keys == {}
    w.close()


def test_from_env_requires_secret() -> None:
    env = {"LOSSYMPI_RANK": "0", "LOSSYMPI_WORLD_SIZE": "2", "LOSSYMPI_RENDEZVOUS": "127.0.0.1:1"}
    with pytest.raises(RendezvousError, match="LOSSYMPI_SECRET is not set"):
        from_env(environ=env)
    with pytest.raises(RendezvousError, match="LOSSYMPI_RENDEZVOUS is not set"):
        from_env(environ={"LOSSYMPI_RANK": "0", "LOSSYMPI_WORLD_SIZE": "2", "LOSSYMPI_SECRET": "x"})
    with pytest.raises(ValueError, match="host:port"):
        from_env(environ={**env, "LOSSYMPI_SECRET": "x", "LOSSYMPI_RENDEZVOUS": "nohostport"})
    with pytest.raises(ValueError, match="not in"):
        from_env(environ={**env, "LOSSYMPI_SECRET": "x", "LOSSYMPI_RANK": "2"})


def test_env_config_parsing() -> None:
    cfg = bootstrap_env._env_config(
        {
            "LOSSYMPI_RANK": "1",
            "LOSSYMPI_WORLD_SIZE": "3",
            "LOSSYMPI_RENDEZVOUS": "node0:29400",
            "LOSSYMPI_SECRET": "s",
            "LOSSYMPI_HOST": "10.0.0.2",
            "LOSSYMPI_PORT_RANGE": "40000-40010",
        }
    )
    assert (cfg.rank, cfg.size, cfg.rdzv_host, cfg.rdzv_port) == (1, 3, "node0", 29400)
    assert cfg.host == "10.0.0.2" and cfg.port_range == (40000, 40010)
    assert len(cfg.secret) == 32
    with pytest.raises(ValueError, match="LOSSYMPI_PORT_RANGE"):
        bootstrap_env._parse_port_range("1-2-3")


def test_from_env_wrong_secret_is_refused() -> None:
    port = free_tcp_port()
    rank0 = RankThread(**env_kw(0, 2, port, secret="right"))
    rank0.start()
    with pytest.raises(RendezvousAuthError, match="LOSSYMPI_SECRET"):
        from_env(**env_kw(1, 2, port, secret="wrong"))
    # the refused rank did not abort the rendezvous: the genuine rank 1 still joins
    w1 = from_env(**env_kw(1, 2, port, secret="right"))
    w0 = rank0.result()
    try:
        check_world_consistency([w0, w1])
        assert w0.info["rejected"].get("auth") == 1
    finally:
        close_all([w0, w1])


def _client_challenge(port: int) -> tuple[socket.socket, dict[str, Any]]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    (length,) = struct.unpack(">I", framing._recv_exact(sock, 4))
    return sock, json.loads(framing._recv_exact(sock, length))


def test_rendezvous_survives_garbage_half_open_and_replay() -> None:
    port = free_tcp_port()
    read_timeout = 10.0
    rank0 = RankThread(**env_kw(0, 3, port, read_timeout=read_timeout))
    rank0.start()
    start = time.monotonic()
    deadline = start + 5
    while True:  # wait for rank 0 to listen
        try:
            half_open = socket.create_connection(("127.0.0.1", port), timeout=1)  # connects, sends nothing
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    bad: list[socket.socket] = [half_open]
    try:
        # 1. someone else's protocol (its first 4 bytes read as a length far above the bound)
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + secrets.token_bytes(100))
        bad.append(s)
        # 2. a huge length prefix (message size is bounded)
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(struct.pack(">I", 1 << 30) + b"x" * 100)
        bad.append(s)
        # 3. a well-framed message that is not JSON
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(struct.pack(">I", 5) + b"\xff{{{\x00")
        bad.append(s)
        # 4. a replayed hello: MAC'ed with the right secret but over another challenge's nonce
        s, challenge = _client_challenge(port)
        assert challenge["type"] == "challenge"
        kp = KeyPair()
        hello: dict[str, Any] = {
            "type": "hello",
            "v": 1,
            "rank": 1,
            "world_size": 3,
            "host": "127.0.0.1",
            "port": 9,
            "public_key": kp.public_bytes.hex(),
            "nonce": secrets.token_bytes(32).hex(),
        }
        secret = hash_secret("test-secret")
        hello["mac"] = messages._mac(secret, messages._HELLO_LABEL, (secrets.token_bytes(32),), hello)
        s.sendall(framing._frame(hello))
        bad.append(s)
        (length,) = struct.unpack(">I", framing._recv_exact(s, 4))
        reply = json.loads(framing._recv_exact(s, length))
        assert reply["type"] == "error" and reply["code"] == "auth"

        # genuine ranks still complete while the half-open connection is still open
        t1, t2 = RankThread(**env_kw(1, 3, port)), RankThread(**env_kw(2, 3, port))
        t1.start()
        t2.start()
        worlds = [rank0.result(), t1.result(), t2.result()]
        elapsed = time.monotonic() - start
    finally:
        for s in bad:
            s.close()
    try:
        assert elapsed < read_timeout, "a half-open connection stalled the rendezvous"
        check_world_consistency(worlds)
        rejected = worlds[0].info["rejected"]
        assert rejected.get("auth") == 1  # the replay
        assert rejected.get("size") == 2  # the huge length prefix and the HTTP request
        assert rejected.get("garbage") == 1  # the non-JSON message
    finally:
        close_all(worlds)


def test_rendezvous_timeout_reports_missing_ranks() -> None:
    with pytest.raises(TimeoutError, match=r"missing ranks \[1\]"):
        from_env(**env_kw(0, 2, free_tcp_port(), timeout=0.5))
    with pytest.raises(TimeoutError, match="could not join"):
        from_env(**env_kw(1, 2, free_tcp_port(), timeout=0.5))


def test_from_env_subprocesses_with_init_auto() -> None:
    """Two processes configured by environment variables only, through ``init()``."""
    port = free_tcp_port()
    code = (
        "import hashlib, json, lossympi.bootstrap as b\n"
        "w = b.init()\n"
        "print(json.dumps({'rank': w.rank, 'addresses': w.addresses,"
        " 'keys': {j: hashlib.sha256(k).hexdigest() for j, k in w.keys.items()}}))\n"
        "w.close()\n"
    )
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOSSYMPI_", "PMI", "OMPI_"))}
        env.update(
            LOSSYMPI_RANK=str(rank),
            LOSSYMPI_WORLD_SIZE="2",
            LOSSYMPI_RENDEZVOUS=f"127.0.0.1:{port}",
            LOSSYMPI_SECRET="subprocess-secret",
            LOSSYMPI_HOST="127.0.0.1",
            PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err.decode()
        outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    outs.sort(key=lambda o: o["rank"])
    assert outs[0]["addresses"] == outs[1]["addresses"]
    assert outs[0]["keys"]["1"] == outs[1]["keys"]["0"]


def test_init_auto_without_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOSSYMPI_RENDEZVOUS", *bootstrap.MPI_LAUNCHER_ENV):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="mpiexec"):
        init()
    with pytest.raises(ValueError, match="unknown bootstrap method"):
        init("carrier-pigeon")


@pytest.mark.parametrize("name", bootstrap.MPI_LAUNCHER_ENV)
def test_under_mpiexec_reads_the_launcher_variables(name: str) -> None:
    assert bootstrap.under_mpiexec({name: "0"})
    assert not bootstrap.under_mpiexec({name: ""})
    assert not bootstrap.under_mpiexec({"LOSSYMPI_RANK": "0"})


def test_lossympi_bootstrap_does_not_import_tensorflow() -> None:
    code = (
        "import sys, lossympi.bootstrap, lossympi.keys; assert 'tensorflow' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------------------------------------------
# MPI
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("port_range", [None, "free"])
def test_from_mpi_under_mpiexec(tmp_path: Path, port_range: str | None) -> None:
    """With ``LOSSYMPI_PORT_RANGE`` every rank binds in the range (a firewall rule can name it)."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        found = shutil.which("mpiexec")
        if found is None:
            pytest.skip(f"no mpiexec next to {sys.executable} nor on PATH")
        mpiexec = Path(found)
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOSSYMPI_", "PMI", "OMPI_"))}
    env.setdefault("HYDRA_LAUNCHER", "fork")
    size = 3
    lo = None
    if port_range is not None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            lo = min(probe.getsockname()[1], 65535 - 64)
        env["LOSSYMPI_PORT_RANGE"] = f"{lo}-{lo + 63}"
    try:
        out = subprocess.run(
            [
                str(mpiexec),
                "-n",
                str(size),
                sys.executable,
                str(ROOT / "tests" / "mpi_bootstrap_prog.py"),
                str(tmp_path),
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("mpiexec -n 3 timed out")
    assert out.returncode == 0, f"mpiexec failed:\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    # one file per rank: the launcher may interleave the ranks' stdout lines
    files = sorted(tmp_path.glob("rank*.json"))
    assert len(files) == size, f"expected {size} reports, got {files}; stderr:\n{out.stderr}"
    reports = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == list(range(size))
    for r in reports:
        assert r["size"] == size
        assert r["addresses"] == reports[0]["addresses"]
        assert r["sockname"] == r["addresses"][r["rank"]]
    for i in range(size):
        for j in range(size):
            if i != j:
                assert reports[i]["keys"][str(j)] == reports[j]["keys"][str(i)]
    assert len({reports[i]["keys"][str(j)] for i in range(size) for j in range(size) if i != j}) == 3
    if lo is not None:
        assert all(lo <= port <= lo + 63 for _, port in reports[0]["addresses"]), reports[0]["addresses"]
