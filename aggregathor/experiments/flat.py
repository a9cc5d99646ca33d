"""A model's trainable variables as one flat float32 vector, and the flat gradient function.

The parameter server ships the parameters and the gradients as one ``(d,)`` float32 vector, in the order of
``model.trainable_variables``, followed by the model's *state*: its floating-point non-trainable variables
(BatchNormalization's moving mean and variance, ...; ``s`` values, often 0), see :meth:`FlatView.get_state`.
:func:`get_flat` is one traced concatenation, :func:`set_flat` one traced
split plus one assignment per variable; :func:`gradient_fn` maps a batch to the flat gradient in one traced
call; :meth:`FlatView.update_fn` applies a flat gradient with an optimizer in one traced call (the parameter
server's update). Python touches each variable only while tracing, never per step. The server and the workers
use this one view.

The layout of a model is computed once and cached (weakly, per model object). If a model's set of trainable
variables changes afterwards (``layer.trainable = False``), call :func:`flat_view` with ``refresh=True``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from aggregathor.tracing import per_object_function

__all__ = ["FlatView", "flat_size", "flat_view", "get_flat", "gradient_fn", "set_flat"]

_VIEWS: weakref.WeakKeyDictionary[Any, FlatView] = weakref.WeakKeyDictionary()


class FlatView:
    """The flat layout of a model's trainable variables, with traced ``get`` and ``set``."""

    def __init__(self, model: keras.Model) -> None:
        if not model.built:
            raise ValueError("the model is not built: build it (or call it once) before flattening it")
        self.variables = list(model.trainable_variables)
        self.shapes = [tuple(int(s) for s in v.shape) for v in self.variables]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.size = int(sum(self.sizes))
        self._get, self._set = _traced_pair(self.variables, self.sizes)
        # the state: floating-point non-trainable variables (integer ones, e.g. a dropout seed, are the worker's own)
        self.state_variables = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]
        self.state_sizes = [int(np.prod(tuple(v.shape), dtype=np.int64)) for v in self.state_variables]
        self.state_size = int(sum(self.state_sizes))
        self._get_state, self._set_state = _traced_pair(self.state_variables, self.state_sizes)

    def get(self) -> tf.Tensor:
        """The ``(d,)`` float32 tensor of the variables' current values (on the variables' device)."""
        return self._get()

    def set(self, vec: Any) -> None:
        """Assign the variables from a ``(d,)`` vector (numpy array or tensor, cast to float32)."""
        if isinstance(vec, tf.Tensor | tf.Variable):
            t = tf.cast(tf.reshape(vec, [-1]), tf.float32)
        else:
            t = tf.convert_to_tensor(np.asarray(vec, dtype=np.float32).reshape(-1))
        if int(t.shape[0]) != self.size:
            raise ValueError(f"flat vector has {int(t.shape[0])} values, the model has {self.size} parameters")
        self._set(t)

    @property
    def wire_size(self) -> int:
        """Values per message on the wire: the ``d`` parameters (or gradient) followed by the ``s`` state values."""
        return self.size + self.state_size

    def get_state(self) -> np.ndarray:
        """The ``(s,)`` float32 values of the state variables (a new array; empty when the model has none)."""
        return self._get_state().numpy()

    def set_state(self, vec: Any) -> None:
        """Assign the state variables from an ``(s,)`` vector."""
        vec = np.asarray(vec, dtype=np.float32).reshape(-1)
        if vec.size != self.state_size:
            raise ValueError(f"state vector has {vec.size} values, the model has {self.state_size} state values")
        self._set_state(tf.convert_to_tensor(vec))

    def get_message(self, out: np.ndarray) -> None:
        """Write the parameters then the state into ``out`` (``(wire_size,)`` float32): what the server sends."""
        out[:self.size] = self.get().numpy()
        out[self.size:] = self.get_state()

    def set_message(self, vec: np.ndarray) -> None:
        """Assign the parameters and the state from a ``(wire_size,)`` message (what a worker receives)."""
        self.set(vec[:self.size])
        self.set_state(vec[self.size:])

    def update_fn(self, optimizer: Any) -> Callable[[Any], None]:
        """A ``tf.function`` applying a flat ``(d,)`` float32 gradient to the variables with ``optimizer``
        (``optimizer.apply_gradients`` on the per-variable pieces). ``fn.get_concrete_function()`` traces it
        (and creates the optimizer's slots) without applying anything."""
        variables, shapes, sizes = self.variables, self.shapes, self.sizes

        def apply(grad: tf.Tensor) -> None:
            if not variables:
                return
            parts = tf.split(grad, sizes)
            optimizer.apply_gradients(
                [(tf.reshape(p, s), v) for p, s, v in zip(parts, shapes, variables, strict=True)])

        return per_object_function(apply, input_signature=[tf.TensorSpec([self.size], tf.float32)], autograph=False)


def _traced_pair(variables: list[Any], sizes: list[int]) -> tuple[Callable[[], tf.Tensor], Callable[[Any], None]]:
    """A traced ``get`` (one float32 concatenation) and ``set`` (one split, one assignment per variable)."""
    shapes = [tuple(int(s) for s in v.shape) for v in variables]

    def get() -> tf.Tensor:
        if not variables:
            return tf.zeros([0], tf.float32)
        return tf.concat([tf.reshape(tf.cast(v.value, tf.float32), [-1]) for v in variables], axis=0)

    def set_(vec: tf.Tensor) -> None:
        if not variables:
            return
        for v, part, shape in zip(variables, tf.split(vec, sizes), shapes, strict=True):
            v.assign(tf.cast(tf.reshape(part, shape), v.dtype))

    return (per_object_function(get, autograph=False),
            per_object_function(set_, input_signature=[tf.TensorSpec([sum(sizes)], tf.float32)], autograph=False))


def flat_view(model: keras.Model, *, refresh: bool = False) -> FlatView:
    """The cached :class:`FlatView` of ``model`` (rebuilt when ``refresh``)."""
    view = None if refresh else _VIEWS.get(model)
    if view is None:
        view = _VIEWS[model] = FlatView(model)
    return view


def flat_size(model: keras.Model) -> int:
    """The number of trainable parameters, ``d``."""
    return flat_view(model).size


def get_flat(model: keras.Model) -> np.ndarray:
    """The trainable variables as one new ``(d,)`` float32 numpy array (one concatenation, one copy)."""
    return flat_view(model).get().numpy()


def set_flat(model: keras.Model, vec: Any) -> None:
    """Assign the trainable variables from a ``(d,)`` vector, in ``model.trainable_variables`` order."""
    flat_view(model).set(vec)


def gradient_fn(model: keras.Model, loss: Callable[[Any, Any], Any], *, training: bool = True,
                jit_compile: bool = False) -> Callable[[Any, Any], tuple[tf.Tensor, tf.Tensor]]:
    """A ``tf.function`` mapping a batch ``(x, y)`` to ``(flat gradient, loss value)``.

    The gradient is the ``(d,)`` float32 gradient of ``loss(y, model(x, training=training))`` plus the
    model's regularization losses, in :func:`get_flat`'s order; a variable the loss does not depend on gets
    zeros. Traced once per input shape (``reduce_retracing``): keep the batch size fixed.
    ``training=True`` runs layers such as dropout and batch normalization in training mode (batch
    normalization then also updates its moving statistics, which are not trainable and not in the vector).
    """
    view = flat_view(model)
    variables, sizes = view.variables, view.sizes

    def step(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            out = model(x, training=training)
            value = loss(y, out)
            if model.losses:
                value = value + tf.add_n([tf.cast(r, value.dtype) for r in model.losses])
        grads = tape.gradient(value, variables)
        flat = [tf.zeros([s], tf.float32) if g is None else tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float32),
                                                                        [-1])
                for g, s in zip(grads, sizes, strict=True)]
        return (tf.concat(flat, axis=0) if flat else tf.zeros([0], tf.float32)), value

    return per_object_function(step, reduce_retracing=True, jit_compile=jit_compile)
