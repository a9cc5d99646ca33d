"""Configuration of the env:// rendezvous: explicit arguments merged over the ``LOSSYMPI_*`` variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..keys import hash_secret, job_secret_from_env
from .addresses import _check_port_range
from .errors import RendezvousError
from .variables import ENV_HOST, ENV_PORT_RANGE, ENV_RANK, ENV_RENDEZVOUS, ENV_SECRET, ENV_WORLD_SIZE

__all__: list[str] = []

@dataclass
class _EnvConfig:
    rank: int
    size: int
    rdzv_host: str
    rdzv_port: int
    secret: bytes
    host: str | None
    port_range: tuple[int, int] | None


_LAUNCH_HELP = (
    f"from_env() needs {ENV_RANK}, {ENV_WORLD_SIZE}, {ENV_RENDEZVOUS}=host:port (rank 0's reachable "
    f"address and a free TCP port) and {ENV_SECRET} (the same long random string on every rank)"
)


def _env_int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        raise RendezvousError(f"{name} is not set; {_LAUNCH_HELP}")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _parse_rendezvous(text: str) -> tuple[str, int]:
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ValueError(f"{ENV_RENDEZVOUS} must look like 'host:port', got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{ENV_RENDEZVOUS} port must be an integer, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{ENV_RENDEZVOUS} port must be in 1..65535, got {port}")
    return host, port


def _parse_port_range(text: str) -> tuple[int, int]:
    """Parse ``"a-b"`` (or a single ``"a"``) from ``LOSSYMPI_PORT_RANGE``."""
    parts = text.strip().split("-")
    try:
        if len(parts) == 1:
            lo = hi = int(parts[0])
        elif len(parts) == 2:
            lo, hi = int(parts[0]), int(parts[1])
        else:
            raise ValueError(text)
    except ValueError as exc:
        raise ValueError(
            f"{ENV_PORT_RANGE} must look like 'first-last', e.g. '29500-29599'; got {text!r}"
        ) from exc
    return _check_port_range((lo, hi))


def _env_config(
    env: Mapping[str, str],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    rendezvous: str | None = None,
    secret: str | bytes | None = None,
    host: str | None = None,
    port_range: tuple[int, int] | None = None,
) -> _EnvConfig:
    """Merge explicit arguments over the ``LOSSYMPI_*`` environment variables and validate them."""
    if secret is None:
        key = job_secret_from_env(env)
        if key is None:
            raise RendezvousError(
                f"{ENV_SECRET} is not set: the env:// rendezvous authenticates every rank with this shared "
                f"job secret and refuses to run without it. Set the same long random string on every rank, "
                f"e.g. export {ENV_SECRET}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
    elif isinstance(secret, str):
        key = hash_secret(secret)
    else:
        key = bytes(secret)
        if len(key) < 16:
            raise ValueError("a bytes secret must be at least 16 bytes long")
    rank = _env_int(env, ENV_RANK) if rank is None else int(rank)
    size = _env_int(env, ENV_WORLD_SIZE) if world_size is None else int(world_size)
    if size < 1:
        raise ValueError(f"world size must be >= 1, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in [0, world size {size})")
    if rendezvous is None:
        rendezvous = env.get(ENV_RENDEZVOUS) or None
        if rendezvous is None:
            raise RendezvousError(f"{ENV_RENDEZVOUS} is not set; {_LAUNCH_HELP}")
    rdzv_host, rdzv_port = _parse_rendezvous(rendezvous)
    if host is None:
        host = env.get(ENV_HOST) or None
    if port_range is None:
        text = env.get(ENV_PORT_RANGE)
        port_range = _parse_port_range(text) if text else None
    else:
        port_range = _check_port_range(port_range)
    return _EnvConfig(rank, size, rdzv_host, rdzv_port, key, host, port_range)
