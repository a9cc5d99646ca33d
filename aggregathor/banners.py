"""Import TensorFlow without its start-up banners on stderr (``aggregathor train --verbose`` shows them).

TensorFlow 2.21 prints its banners from the static initializers of its shared libraries, while ``import
tensorflow`` loads them: absl's "All log messages before absl::InitializeLog() is called are written to STDERR",
"oneDNN custom operations are on ...", the CPU feature notice, and on CUDA builds the cuDNN/cuFFT/cuBLAS factory
and ``cuInit`` probes. ``TF_CPP_MIN_LOG_LEVEL`` is read only after they are printed, and absl reads no environment
variable, so the one place to silence them is the file descriptor: :func:`import_tensorflow` points fd 2 at a
temporary file for the import, then keeps the banner lines (:data:`captured`, :func:`replay`) and writes every
other line (a real warning or error) to stderr as it came.

Standard library only: ``aggregathor/__init__.py`` imports this module before TensorFlow. With
``AGGREGATHOR_VERBOSE=1`` in the environment (the local launcher sets it in its ranks under ``--verbose``) nothing
is captured.
"""

from __future__ import annotations

import os
import sys
import tempfile
from types import ModuleType

__all__ = ["BANNER_MARKERS", "captured", "import_tensorflow", "is_banner", "replay"]

#: A line that contains one of these is a start-up banner.
BANNER_MARKERS = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "cpu_feature_guard.cc",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning",
    "Could not find cuda drivers",
    "failed call to cuInit",
    "Could not find TensorRT",
    "could not open file to read NUMA node",
)

#: The banner lines the import printed (empty when nothing was captured).
captured: list[str] = []


def is_banner(line: str) -> bool:
    """True when ``line`` is one of TensorFlow's start-up banners."""
    return any(marker in line for marker in BANNER_MARKERS)


def import_tensorflow() -> ModuleType:
    """``import tensorflow`` with its banners kept out of stderr (see the module notes); returns the module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the INFO and WARNING logs after the start-up
    if os.environ.get("AGGREGATHOR_VERBOSE") == "1" or "tensorflow" in sys.modules:
        import tensorflow

        return tensorflow
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            import tensorflow
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            others = []
            for line in text.splitlines(keepends=True):
                (captured if is_banner(line) else others).append(line)
            if others:
                sys.stderr.write("".join(others))
                sys.stderr.flush()
    return tensorflow


def replay() -> None:
    """Write the banners :func:`import_tensorflow` kept to stderr (``--verbose``)."""
    if captured:
        sys.stderr.write("".join(captured))
        sys.stderr.flush()
