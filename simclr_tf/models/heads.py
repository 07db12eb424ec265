"""Projection and supervised heads of SimCLR (SPEC.md §4).

Reference: `LinearLayer`, `ProjectionHead` and `SupervisedHead` of the
authors' `tf2/model.py`, minus its bug in `linear` mode (it returns None).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf.models import layers as layers_lib
from simclr_tf.models.layers import build_once

PROJ_HEAD_MODES = ("none", "linear", "nonlinear")

_register = keras.saving.register_keras_serializable(package="simclr_tf")


def dense_initializer() -> keras.initializers.Initializer:
    """Init of every head kernel (reference: RandomNormal(stddev=0.01))."""
    return keras.initializers.RandomNormal(stddev=0.01)


@_register
class LinearLayer(keras.layers.Layer):
    """Dense, then optionally BN without ReLU (reference `LinearLayer`).

    The Dense has a bias only when `use_bias and not use_bn`; the BN learns
    an offset (center) only when `use_bias`.

    Args:
      units: output width; None keeps the width of the input.
      use_bias: see above.
      use_bn: add a BN after the Dense.
      batch_norm_decay: BN momentum.
      global_bn: synchronised BN.
      **kwargs: base layer arguments (`name`, `dtype`, ...).
    """

    def __init__(
        self,
        units: int | None,
        use_bias: bool = True,
        use_bn: bool = False,
        batch_norm_decay: float = 0.9,
        global_bn: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = units
        self.use_bias = use_bias
        self.use_bn = use_bn
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.dense = None  # Created in build: `units` may be the input width.
        self.bn = None
        if use_bn:
            self.bn = layers_lib.batch_norm(
                batch_norm_decay, global_bn, center=use_bias, name="bn"
            )

    def output_units(self, input_dim: int) -> int:
        """The output width for an input of width `input_dim`."""
        return input_dim if self.units is None else self.units

    def build(self, input_shape):
        units = self.output_units(input_shape[-1])
        self.dense = keras.layers.Dense(
            units,
            use_bias=self.use_bias and not self.use_bn,
            kernel_initializer=dense_initializer(),
            name="dense",
        )
        build_once(self.dense, input_shape)
        if self.bn is not None:
            build_once(self.bn, (None, units))

    def call(self, inputs, training=None):
        x = self.dense(inputs)
        if self.bn is not None:
            x = self.bn(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.output_units(input_shape[-1]))

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "use_bias": self.use_bias,
            "use_bn": self.use_bn,
            "batch_norm_decay": self.batch_norm_decay,
            "global_bn": self.global_bn,
        }


@_register
class ProjectionHead(keras.layers.Layer):
    """The projection g(h) of SimCLR; keeps every intermediate layer.

    `call(h)` returns the list [h, h_1, ..., h_L] (L = `num_layers`), so
    that `hiddens[-1]` is the projection used by the contrastive loss and
    `hiddens[j]` (`ft_proj_selector = j`) the supervised head's input.

    - `nonlinear`: L - 1 layers of Dense(input width) + BN (+ bias) + ReLU,
      then Dense(`out_dim`) + BN without bias or ReLU.
    - `linear`: one Dense(`out_dim`) + BN without bias (L = 1).
    - `none`: the identity (L = 0).

    Args:
      mode: "none", "linear" or "nonlinear".
      out_dim: width of the last layer (`proj_out_dim`).
      num_layers: L for `nonlinear` (`num_proj_layers`).
      batch_norm_decay: BN momentum.
      global_bn: synchronised BN.
      **kwargs: base layer arguments.

    Raises:
      ValueError: an unknown mode or a non-positive `num_layers`.
    """

    def __init__(
        self,
        mode: str = "nonlinear",
        out_dim: int = 128,
        num_layers: int = 3,
        batch_norm_decay: float = 0.9,
        global_bn: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mode not in PROJ_HEAD_MODES:
            raise ValueError(
                f"Received: mode={mode!r}. Use one of "
                f"{', '.join(PROJ_HEAD_MODES)}."
            )
        if mode == "nonlinear" and num_layers < 1:
            raise ValueError(
                f"Received: num_layers={num_layers} for the nonlinear head. "
                "Use num_layers >= 1."
            )
        self.mode = mode
        self.out_dim = out_dim
        self.num_layers = num_layers
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        bn_kwargs = dict(batch_norm_decay=batch_norm_decay, global_bn=global_bn)
        layers = []
        if mode == "linear":
            layers = [
                LinearLayer(out_dim, False, True, name="l_0", **bn_kwargs)
            ]
        elif mode == "nonlinear":
            layers = [
                LinearLayer(None, True, True, name=f"nl_{j}", **bn_kwargs)
                for j in range(num_layers - 1)
            ]
            layers.append(
                LinearLayer(
                    out_dim,
                    False,
                    True,
                    name=f"nl_{num_layers - 1}",
                    **bn_kwargs,
                )
            )
        self._layer_names = layers_lib.set_layer_attributes(self, layers)

    @property
    def linear_layers(self) -> list[LinearLayer]:
        """The head's layers, in order (empty for the `none` head)."""
        return [getattr(self, name) for name in self._layer_names]

    def hidden_dims(self, input_dim: int) -> list[int]:
        """Widths of [h, h_1, ..., h_L] for an input of width `input_dim`."""
        dims = [input_dim]
        for layer in self.linear_layers:
            dims.append(layer.output_units(dims[-1]))
        return dims

    def build(self, input_shape):
        for layer, dim in zip(
            self.linear_layers, self.hidden_dims(input_shape[-1]), strict=False
        ):
            build_once(layer, (None, dim))

    def call(self, inputs, training=None) -> list[tf.Tensor]:
        hiddens = [inputs]
        last = len(self.linear_layers) - 1
        for j, layer in enumerate(self.linear_layers):
            x = layer(hiddens[-1], training=training)
            if self.mode == "nonlinear" and j != last:
                x = tf.nn.relu(x)
            hiddens.append(x)
        return hiddens

    def compute_output_shape(self, input_shape):
        return [
            (input_shape[0], dim) for dim in self.hidden_dims(input_shape[-1])
        ]

    def get_config(self):
        return {
            **super().get_config(),
            "mode": self.mode,
            "out_dim": self.out_dim,
            "num_layers": self.num_layers,
            "batch_norm_decay": self.batch_norm_decay,
            "global_bn": self.global_bn,
        }


@_register
class SupervisedHead(keras.layers.Layer):
    """Linear classifier: Dense(num_classes) with bias, no BN.

    Args:
      num_classes: number of logits.
      zero_init: start from a zero kernel (`zero_init_logits_layer`);
        otherwise RandomNormal(stddev=0.01) as the reference.
      **kwargs: base layer arguments.
    """

    def __init__(self, num_classes: int, zero_init: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.zero_init = zero_init
        self.dense = keras.layers.Dense(
            num_classes,
            kernel_initializer="zeros" if zero_init else dense_initializer(),
            name="dense",
        )

    @property
    def kernels(self) -> list[keras.Variable]:
        """The kernel variables (L2-decayed by the loss under LARS)."""
        return [self.dense.kernel]

    def build(self, input_shape):
        build_once(self.dense, input_shape)

    def call(self, inputs):
        return self.dense(inputs)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "zero_init": self.zero_init,
        }
