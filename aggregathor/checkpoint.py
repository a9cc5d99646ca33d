"""Crash-safe checkpoints and file writes: a SIGKILL at any moment never leaves a corrupt checkpoint.

Layout of a checkpoint directory (one writer: the parameter server)::

    <dir>/step-0000000040/MANIFEST.json   {"format": 1, "step": 40, "files": {name: {"bytes", "sha256"}}}
    <dir>/step-0000000040/ckpt.index ...  whatever the payload writer produced (TensorFlow's files)
    <dir>/LATEST                          "step-0000000040" (informative; restore does not need it)

Saving step ``N`` (:meth:`AtomicCheckpoints.save`):

1. the payload is written into a fresh hidden directory ``.tmp-N-<pid>-<random>``, then its ``MANIFEST.json``
   (size and SHA-256 of every file);
2. every file and that directory are fsynced;
3. the directory is renamed to ``step-N``: the rename is atomic, so ``step-N`` either does not exist or is
   complete. This is the commit point. The parent directory is fsynced so that the rename survives a power cut;
4. ``LATEST`` is replaced atomically (:func:`atomic_write_text`);
5. checkpoints beyond the ``keep`` newest are renamed to ``.trash-...`` (atomic) and deleted.

Restoring (:meth:`AtomicCheckpoints.restore`) tries the ``step-*`` directories newest first: a checkpoint whose
manifest is missing or does not match its files (sizes, SHA-256), or whose payload the reader rejects, is skipped
with a warning, and the previous one is used. Hidden ``.tmp-``/``.trash-`` leftovers of a crashed save (and of
:func:`atomic_write_text`) are removed when the directory is opened. A crash therefore loses at most the steps
since the last completed save.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["AtomicCheckpoints", "atomic_write_text", "fsync_dir"]

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
LATEST = "LATEST"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{10})$")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so that the creations, renames and deletions inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically: a reader (or a crash) sees the old file or the new one, never a
    truncated one. The text goes to a temporary file in the same directory, is fsynced, then replaces ``path``
    with ``os.replace``; the directory is fsynced last.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class AtomicCheckpoints:
    """Numbered, crash-safe checkpoints in one directory (see the module notes for the protocol).

    Parameters
    ----------
    directory : path
        Where the checkpoints live; created if needed. One process writes it at a time; any number may read
        (:meth:`restore`, :meth:`latest_valid`) while it writes.
    keep : int
        How many of the newest checkpoints to keep (at least 1).
    prefix : str
        Name of the payload inside a checkpoint directory: the writer and the reader get
        ``<checkpoint dir>/<prefix>`` (TensorFlow appends ``.index`` and ``.data-...``).
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3, prefix: str = "ckpt") -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.prefix = prefix
        self.skipped: list[tuple[int, str]] = []  # (step, why) of the checkpoints restore() could not use
        self._cleaned = False

    def clean(self) -> None:
        """Remove what a crashed save left: its uncommitted directory, a half-deleted old checkpoint, a temporary
        ``LATEST``. Only the writer may call it (:meth:`save` does, once): it would delete a save in progress."""
        for leftover in [*self.dir.glob(".tmp-*"), *self.dir.glob(".trash-*")]:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    leftover.unlink()
        self._cleaned = True

    # ------------------------------------------------------------------ listing
    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, oldest first (validity is checked by :meth:`verify`)."""
        out = []
        for p in self.dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def path(self, step: int) -> Path:
        """The directory of checkpoint ``step``."""
        return self.dir / f"step-{step:010d}"

    def verify(self, step: int) -> str | None:
        """None when checkpoint ``step`` is complete and intact, else why it is not."""
        d = self.path(step)
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except FileNotFoundError:
            return "no manifest"
        except (OSError, ValueError) as exc:
            return f"unreadable manifest ({type(exc).__name__})"
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("step") != step:
            return "manifest of another format or step"
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return "manifest lists no files"
        for name, meta in files.items():
            if not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(meta, dict):
                return "malformed manifest entry"
            f = d / name
            try:
                size = f.stat().st_size
            except OSError:
                return f"{name} is missing"
            if size != meta.get("bytes"):
                return f"{name} has {size} bytes, the manifest says {meta.get('bytes')}"
            if _sha256(f) != meta.get("sha256"):
                return f"{name} does not match its SHA-256"
        return None

    # ------------------------------------------------------------------ save
    def save(self, step: int, write: Callable[[str], object]) -> Path:
        """Commit checkpoint ``step``: ``write(prefix)`` writes the payload files under ``prefix``.

        Returns the checkpoint's directory. An existing checkpoint of the same step is replaced.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not self._cleaned:
            self.clean()
        tmp = self.dir / f".tmp-{step}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            write(str(tmp / self.prefix))
            files = {}
            for f in sorted(tmp.rglob("*")):
                if f.is_dir():
                    raise RuntimeError(f"the checkpoint writer created a subdirectory {f}; write flat files")
                files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
            if not files:
                raise RuntimeError(f"the checkpoint writer wrote nothing under {tmp / self.prefix}")
            (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            final = self.path(step)
            if final.exists():  # e.g. the final save of a run that resumed from its last checkpoint
                self._discard(final)
            os.rename(tmp, final)  # the commit point
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.dir)
        atomic_write_text(self.dir / LATEST, final.name + "\n")
        for old in self.steps()[:-self.keep]:
            self._discard(self.path(old))
        return final

    def _discard(self, d: Path) -> None:
        trash = self.dir / f".trash-{d.name}-{secrets.token_hex(4)}"
        os.rename(d, trash)  # atomic: the checkpoint is gone as a whole before its files are deleted
        fsync_dir(self.dir)
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ restore
    def restore(self, read: Callable[[str], object]) -> int | None:
        """Load the newest intact checkpoint with ``read(prefix)``; returns its step, or None if there is none.

        A checkpoint that fails :meth:`verify`, or whose ``read`` raises, is skipped with a warning (recorded in
        :attr:`skipped`) and the previous one is tried.
        """
        self.skipped = []
        for step in reversed(self.steps()):
            why = self.verify(step)
            if why is None:
                try:
                    read(str(self.path(step) / self.prefix))
                    return step
                except Exception as exc:  # a payload the reader rejects: fall back like a corrupt one
                    why = f"the reader failed: {type(exc).__name__}: {str(exc)[:300]}"
            self.skipped.append((step, why))
            log.warning("checkpoint %s is unusable (%s); falling back to the previous one", self.path(step), why)
        return None

    def latest_valid(self) -> int | None:
        """Step of the newest checkpoint that passes :meth:`verify` (without loading it), or None."""
        for step in reversed(self.steps()):
            if self.verify(step) is None:
                return step
        return None
