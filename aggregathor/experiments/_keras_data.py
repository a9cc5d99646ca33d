"""Keras's downloadable data sets (MNIST, Fashion-MNIST, CIFAR-10), offline-aware.

The files live where Keras caches them, ``$KERAS_HOME/datasets`` (default ``~/.keras/datasets``), with the
names and layout of ``keras.datasets.*.load_data``: a set downloaded by Keras is found here and vice versa.
The cache is checked first; a missing file is downloaded with ``keras.utils.get_file`` only after a quick
reachability probe of its server (a few seconds at most, never a minutes-long network timeout), and when it
can be neither found nor downloaded :class:`~aggregathor.experiments.base.DatasetUnavailable` says which
file is missing, where it was looked for, and how to get it. Downloads are off with ``download=False`` or
the environment variable ``AGGREGATHOR_OFFLINE=1``.
"""

from __future__ import annotations

import gzip
import os
import pickle
import socket
import tarfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from aggregathor.experiments.base import Arrays, DatasetUnavailable

__all__ = ["cache_root", "load", "reachable", "SPECS"]

_GCS = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
_MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
_FASHION = ("train-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz")

#: name -> (Keras loader to run on a connected machine, files under ``datasets/`` it leaves there)
SPECS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mnist": ("keras.datasets.mnist.load_data()", ("mnist.npz",)),
    "fashion-mnist": ("keras.datasets.fashion_mnist.load_data()", tuple(f"fashion-mnist/{f}" for f in _FASHION)),
    "cifar10": ("keras.datasets.cifar10.load_data()", ("cifar-10-batches-py-target/cifar-10-batches-py/",)),
}


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Keras cache folder: ``cache_dir``, else ``$KERAS_HOME`` (read now), else ``~/.keras``.

    Like Keras, an unwritable home falls back to ``/tmp/.keras``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("KERAS_HOME"):
        return Path(os.environ["KERAS_HOME"]).expanduser()
    home = Path("~").expanduser()
    return (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s server (or the configured HTTP(S) proxy) opens within ``timeout``.

    Runs in a daemon thread joined with ``timeout``, so a hanging DNS lookup cannot stall the caller either.
    """
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, name=f"probe-{host}", daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok and ok[0])


def _offline_env() -> bool:
    return os.environ.get("AGGREGATHOR_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(name: str, root: Path, missing: list[Path], url: str, why: str) -> DatasetUnavailable:
    loader, _ = SPECS[name]
    what = {"mnist": "mnist.npz",
            "fashion-mnist": "the folder fashion-mnist/ (its four .gz files)",
            "cifar10": "cifar-10-python.tar.gz (extracted on first use), or the folder cifar-10-batches-py-target/ "
                       "that Keras extracted it to,"}[name]
    listed = "\n".join(f"  {p}" for p in missing)
    msg = (f"data set {name!r} is not available: {why}.\n"
           f"Missing (looked for):\n{listed}\n"
           f"To get it, on a machine with network access run\n"
           f"  python -c \"import keras; {loader}\"\n"
           f"(Keras caches it under ~/.keras/datasets/) or download {url}; then copy {what} into\n"
           f"  {root / 'datasets'}/\n"
           f"on this machine, or point KERAS_HOME (or the experiment's cache_dir= option) at a folder whose "
           f"datasets/ subfolder holds it.")
    return DatasetUnavailable(msg, dataset=name, missing=[str(p) for p in missing], url=url)


def _fetch(name: str, root: Path, missing: list[Path], url: str, download: bool | None, probe_timeout: float,
           fetch: Callable[[], object]) -> None:
    if download is None:
        download = not _offline_env()
    if not download:
        why = ("downloads are disabled (AGGREGATHOR_OFFLINE is set)" if _offline_env()
               else "it is not in the cache and downloads are disabled (download=False)")
        raise _unavailable(name, root, missing, url, why)
    if not reachable(url, probe_timeout):
        raise _unavailable(name, root, missing, url,
                           f"it is not in the cache and {urllib.parse.urlsplit(url).hostname} cannot be reached "
                           f"(no connection within {probe_timeout:g} s: offline?)")
    try:
        fetch()
    except Exception as exc:  # any download failure becomes the helpful error
        raise _unavailable(name, root, missing, url, f"the download failed ({exc})") from exc


def _get_file(root: Path, fname: str, origin: str, **kwargs: object) -> str:
    import keras

    return keras.utils.get_file(fname=fname, origin=origin, cache_dir=str(root), **kwargs)


# ---------------------------------------------------------------------- the data sets
def _mnist(root: Path, download: bool | None, probe_timeout: float) -> tuple[Arrays, Arrays]:
    path = root / "datasets" / "mnist.npz"
    if not path.is_file():
        url = f"{_GCS}mnist.npz"
        got: list[str] = []
        _fetch("mnist", root, [path], url, download, probe_timeout,
               lambda: got.append(_get_file(root, "mnist.npz", url, file_hash=_MNIST_SHA256)))
        path = Path(got[0])  # Keras falls back to /tmp/.keras when the cache folder is not writable
    with np.load(path, allow_pickle=False) as f:
        return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])


def _fashion(root: Path, download: bool | None, probe_timeout: float) -> tuple[Arrays, Arrays]:
    folder = root / "datasets" / "fashion-mnist"
    paths = [folder / f for f in _FASHION]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        def fetch() -> None:
            for p in missing:
                _get_file(root, p.name, _GCS + p.name, cache_subdir=os.path.join("datasets", "fashion-mnist"))

        _fetch("fashion-mnist", root, missing, _GCS, download, probe_timeout, fetch)

    def read(p: Path, offset: int) -> np.ndarray:
        with gzip.open(p, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    y_train, y_test = read(paths[0], 8), read(paths[2], 8)
    x_train = read(paths[1], 16).reshape(len(y_train), 28, 28)
    x_test = read(paths[3], 16).reshape(len(y_test), 28, 28)
    return (x_train, y_train), (x_test, y_test)


def _cifar_dir(datasets: Path) -> Path | None:
    for d in (datasets / "cifar-10-batches-py-target" / "cifar-10-batches-py", datasets / "cifar-10-batches-py"):
        if (d / "test_batch").is_file() and all((d / f"data_batch_{i}").is_file() for i in range(1, 6)):
            return d
    return None


def _cifar10(root: Path, download: bool | None, probe_timeout: float) -> tuple[Arrays, Arrays]:
    datasets = root / "datasets"
    folder = _cifar_dir(datasets)
    if folder is None:
        target = datasets / "cifar-10-batches-py-target"
        for archive in (datasets / "cifar-10-python.tar.gz", datasets / "cifar-10-batches-py-target_archive"):
            if archive.is_file():
                target.mkdir(parents=True, exist_ok=True)
                with tarfile.open(archive, "r:gz") as tar:
                    tar.extractall(target, filter="data")
                break
        else:
            missing = [target / "cifar-10-batches-py", datasets / "cifar-10-batches-py",
                       datasets / "cifar-10-python.tar.gz"]
            _fetch("cifar10", root, missing, _CIFAR_URL, download, probe_timeout,
                   lambda: _get_file(root, "cifar-10-batches-py-target", _CIFAR_URL, extract=True,
                                     file_hash=_CIFAR_SHA256))
        folder = _cifar_dir(datasets)
        if folder is None:
            raise _unavailable("cifar10", root, [target / "cifar-10-batches-py"], _CIFAR_URL,
                               "the archive did not contain the expected cifar-10-batches-py/ batches")

    def batch(p: Path) -> Arrays:
        with p.open("rb") as f:
            d = pickle.load(f, encoding="bytes")  # the CIFAR-10 distribution format (trusted file)
        x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x, np.asarray(d[b"labels"], np.uint8)

    parts = [batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return train, batch(folder / "test_batch")


_LOADERS = {"mnist": _mnist, "fashion-mnist": _fashion, "cifar10": _cifar10}


def load(name: str, cache_dir: str | os.PathLike[str] | None = None, download: bool | None = None,
         probe_timeout: float = 3.0) -> tuple[Arrays, Arrays]:
    """``((x_train, y_train), (x_test, y_test))`` of a Keras data set, as the raw ``uint8`` arrays.

    ``download=None`` downloads unless ``AGGREGATHOR_OFFLINE`` is set. Raises DatasetUnavailable.
    """
    return _LOADERS[name](cache_root(cache_dir), download, float(probe_timeout))
