"""``per_object_function``: ``tf.function`` for functions made anew for each model, optimizer or rule.

TensorFlow warns about "excessive retracing" by counting, over the last calls, the traces of every ``tf.function``
whose Python function has the same *code object*. A closure or a bound method made for each model (the flat view's
``get``, the optimizer update, the evaluation) has the same code for every model, so a process that builds a few
models (several runs of :func:`aggregathor.train`, or the simulated launcher's workers) looked like one function
retracing, although each traced once. Wrapping the function in :func:`functools.partial` keys the count by this
function object alone: a function that really retraces (new shapes at every call) still warns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import tensorflow as tf

__all__ = ["per_object_function"]


def per_object_function(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """``tf.function(fn, **kwargs)``, its retracing counted on its own (see the module notes).

    Examples
    --------
    >>> import tensorflow as tf
    >>> v = tf.Variable(1.0)
    >>> get = per_object_function(lambda: v * 2, autograph=False)
    >>> float(get())
    2.0
    """
    return tf.function(functools.partial(fn), **kwargs)
