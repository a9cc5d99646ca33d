"""The experiments' Keras models. Every model outputs logits (no softmax) and is built on creation."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

__all__ = ["LocalResponseNormalization", "ParameterPadding", "cifarnet", "mlp", "small_cnn"]


def mlp(input_shape: Sequence[int], hidden: Sequence[int], classes: int, *, name: str = "mlp") -> keras.Model:
    """Flatten, then ReLU dense layers of the ``hidden`` widths, then a linear ``classes``-way layer."""
    layers: list[keras.layers.Layer] = [keras.Input(tuple(input_shape))]
    if len(input_shape) != 1:
        layers.append(keras.layers.Flatten())
    layers += [keras.layers.Dense(int(h), activation="relu") for h in hidden]
    layers.append(keras.layers.Dense(int(classes)))
    return keras.Sequential(layers, name=name)


def small_cnn(input_shape: Sequence[int], classes: int, *, filters: Sequence[int] = (32, 64), dense: int = 128,
              image_shape: Sequence[int] | None = None, name: str = "cnn") -> keras.Model:
    """3x3 ReLU convolutions (``same`` padding) each followed by a 2x2 max-pool, a ReLU dense layer, logits.

    ``image_shape`` reshapes flat inputs (e.g. 64 digits pixels -> ``(8, 8, 1)``) first.
    """
    layers: list[keras.layers.Layer] = [keras.Input(tuple(input_shape))]
    if image_shape is not None:
        layers.append(keras.layers.Reshape(tuple(image_shape)))
    for f in filters:
        layers += [keras.layers.Conv2D(int(f), 3, padding="same", activation="relu"),
                   keras.layers.MaxPooling2D(2)]
    layers += [keras.layers.Flatten(), keras.layers.Dense(int(dense), activation="relu"),
               keras.layers.Dense(int(classes))]
    return keras.Sequential(layers, name=name)


@keras.saving.register_keras_serializable(package="aggregathor")
class LocalResponseNormalization(keras.layers.Layer):
    """``tf.nn.local_response_normalization`` as a layer (no parameters), as in CifarNet."""

    def __init__(self, depth_radius: int = 4, bias: float = 1.0, alpha: float = 0.001 / 9.0, beta: float = 0.75,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.depth_radius, self.bias, self.alpha, self.beta = int(depth_radius), bias, alpha, beta

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.nn.local_response_normalization(inputs, depth_radius=self.depth_radius, bias=self.bias,
                                                  alpha=self.alpha, beta=self.beta)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "depth_radius": self.depth_radius, "bias": self.bias,
                "alpha": self.alpha, "beta": self.beta}


def cifarnet(input_shape: Sequence[int] = (32, 32, 3), classes: int = 10, *, lrn: bool = True) -> keras.Model:
    """CifarNet, the original AggregaThor's ``cnnet`` (the TensorFlow CIFAR-10 tutorial model), on 32x32x3.

    conv 5x5x64 (ReLU) -> max-pool 3x3/2 -> LRN -> conv 5x5x64 (ReLU) -> LRN -> max-pool 3x3/2 ->
    dense 384 (ReLU) -> dense 192 (ReLU) -> dense 10. 1,756,426 parameters on 32x32x3 inputs. The local
    response normalizations have no parameters; ``lrn=False`` leaves them out.
    """
    lrn_layer = (lambda: [LocalResponseNormalization()]) if lrn else (lambda: [])
    layers: list[keras.layers.Layer] = [
        keras.Input(tuple(input_shape)),
        keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(3, strides=2, padding="same"),
        *lrn_layer(),
        keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
        *lrn_layer(),
        keras.layers.MaxPooling2D(3, strides=2, padding="same"),
        keras.layers.Flatten(),
        keras.layers.Dense(384, activation="relu"),
        keras.layers.Dense(192, activation="relu"),
        keras.layers.Dense(int(classes)),
    ]
    return keras.Sequential(layers, name="cifarnet")


@keras.saving.register_keras_serializable(package="aggregathor")
class ParameterPadding(keras.layers.Layer):
    """``size`` extra trainable parameters that do not change the output (their gradient is exactly zero).

    Pads a model to an exact parameter count for transport benchmarks (see the ``synthetic`` experiment).
    """

    def __init__(self, size: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.size = int(size)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.padding = self.add_weight(shape=(self.size,), initializer="zeros", name="padding")

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        # 0 * sum(w): keeps the weight on the gradient tape (zero gradient, never None).
        return inputs + tf.cast(0.0 * tf.reduce_sum(self.padding), inputs.dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "size": self.size}
