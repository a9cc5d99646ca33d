"""aggregathor: Byzantine-resilient distributed SGD on TensorFlow 2 over lossympi.

A trusted parameter server aggregates the workers' gradients with robust rules (median, Multi-Krum,
Bulyan, ...) so that up to f Byzantine workers cannot poison learning (Damaskinos et al., SysML 2019).
Importing this package imports TensorFlow; :mod:`lossympi` (the transport) does not.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

__version__ = "0.1.0"

__all__ = ["__version__", "devices", "default_device"]


def devices() -> dict[str, list[str]]:
    """Logical TensorFlow devices by type, e.g. ``{"CPU": ["/device:CPU:0"], "GPU": [...]}``."""
    out: dict[str, list[str]] = {}
    for d in tf.config.list_logical_devices():
        out.setdefault(d.device_type, []).append(d.name)
    return out


def default_device() -> str:
    """The device the aggregation rules run on: the first GPU when present, else the CPU."""
    found = devices()
    return (found.get("GPU") or found["CPU"])[0]
