"""The SimCLR network: an encoder and heads composed into one keras.Model."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import keras
import tensorflow as tf

from simclr_tf.models import heads as heads_lib
from simclr_tf.models import resnet as resnet_lib
from simclr_tf.models.layers import build_once

IMAGE_CHANNELS = 3

# Layers whose `bias` the reference's 'bias' name filter catches.
_BIAS_LAYERS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.Conv2DTranspose,
)


@dataclasses.dataclass(frozen=True)
class WeightGroups:
    """The model's variables the optimizer and the loss treat apart.

    Chosen by object (layer type and membership), never by name; each
    tuple keeps the model's variable order and holds each variable once.

    Attributes:
      batch_norm: gamma and beta of every `BatchNormalization` layer.
      biases: the `bias` of every Dense and convolution layer.
      supervised_head: every variable of the supervised head (empty
        without one).
    """

    batch_norm: tuple
    biases: tuple
    supervised_head: tuple

    @property
    def lars_exclusions(self) -> tuple:
        """Variables LARS leaves without weight decay and trust ratio.

        The reference excludes, by name, 'batch_normalization', 'bias' and
        'head_supervised': the batch-norm parameters, every bias and the
        supervised head, each once.
        """
        return _unique(self.batch_norm + self.biases + self.supervised_head)


def _unique(variables: Iterable) -> tuple:
    seen, out = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return tuple(out)


def weight_groups(model: keras.layers.Layer) -> WeightGroups:
    """Collects the `WeightGroups` of a built model.

    Args:
      model: a built layer or model; its `supervised_head` attribute (may
        be None or absent) is the linear classifier.

    Returns:
      The model's batch-norm parameters, biases and supervised head.
    """
    # Keras 3 has no public recursive layer walk; `_flatten_layers` is what
    # Keras itself uses to collect weights.
    layers = model._flatten_layers(include_self=True, recursive=True)
    head = getattr(model, "supervised_head", None)
    return WeightGroups(
        batch_norm=_unique(
            w
            for layer in layers
            if isinstance(layer, keras.layers.BatchNormalization)
            for w in (layer.gamma, layer.beta)
            if w is not None
        ),
        biases=_unique(
            layer.bias
            for layer in layers
            if isinstance(layer, _BIAS_LAYERS)
            and getattr(layer, "bias", None) is not None
        ),
        supervised_head=() if head is None else _unique(head.weights),
    )


@keras.saving.register_keras_serializable(package="simclr_tf")
class SimCLRModel(keras.Model):
    """Encoder + projection head (+ supervised head), parts injected.

    `call(images, training)` takes (B, H, W, 3 * v) images in [0, 1] that
    hold v views side by side on the channel axis (v = `num_views` in
    pretraining, 1 for single-view eval or fine-tuning input), and runs the
    views as one view-major batch of v * B rows (rows [0:B] are view 1). It
    returns a dict of float32 tensors:

    - `proj_head_output`: (v * B, proj_out_dim), the last projection layer
      (the encoder output for the `none` head);
    - `proj_head_input`: (v * B, feature_dim), = `final_avg_pool`;
    - `logits_sup`: (v * B, num_classes), only with a supervised head; it
      reads the projection-head layer `ft_proj_selector` (0 = encoder
      output, -1 = last), behind a stop-gradient when
      `stop_gradient_supervised` (linear eval during pretraining);
    - the encoder endpoints `initial_conv`, `initial_max_pool`,
      `block_group1` ... `block_group4`, `final_avg_pool`.

    Args:
      encoder: the `ResNet` (returns a dict with `final_avg_pool`).
      projection_head: the `ProjectionHead`.
      supervised_head: the `SupervisedHead`, or None.
      ft_proj_selector: index into the projection head's hidden list.
      num_views: views per example in the training input.
      stop_gradient_supervised: stop the supervised loss's gradient at the
        head's input (pretraining with `lineareval_while_pretraining`).
      **kwargs: base `keras.Model` arguments (`name`, ...).

    Raises:
      ValueError: `ft_proj_selector` outside the projection head's layers.
    """

    def __init__(
        self,
        encoder: resnet_lib.ResNet,
        projection_head: heads_lib.ProjectionHead,
        supervised_head: heads_lib.SupervisedHead | None = None,
        ft_proj_selector: int = 0,
        num_views: int = 1,
        stop_gradient_supervised: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        num_hiddens = len(projection_head.linear_layers) + 1
        if not -num_hiddens <= ft_proj_selector < num_hiddens:
            raise ValueError(
                f"Received: ft_proj_selector={ft_proj_selector}, but the "
                f"{projection_head.mode} projection head has "
                f"{num_hiddens - 1} layers. Use a value in "
                f"[{-num_hiddens}, {num_hiddens - 1}]."
            )
        self.encoder = encoder
        self.projection_head = projection_head
        self.supervised_head = supervised_head
        self.ft_proj_selector = ft_proj_selector
        self.num_views = num_views
        self.stop_gradient_supervised = stop_gradient_supervised
        self._weight_groups = None

    @property
    def weight_groups(self) -> WeightGroups:
        """The batch-norm, bias and supervised-head variables (built model).

        Collected on first use and kept: the optimizer's exclusions and the
        loss's decayed variables both come from this one walk.
        """
        if self._weight_groups is None:
            if not self.built:
                raise ValueError(
                    "Received: an unbuilt SimCLRModel. Build it (call it on "
                    "a batch or `build(input_shape)`) before asking for its "
                    "weight groups."
                )
            # A plain object, not tracked: checkpoints keep their layout.
            self._weight_groups = weight_groups(self)
        return self._weight_groups

    @property
    def supervised_head_kernels(self) -> list[keras.Variable]:
        """Kernels of the supervised head ([] without one)."""
        if self.supervised_head is None:
            return []
        return self.supervised_head.kernels

    def build(self, input_shape):
        build_once(self.encoder, (None, None, None, IMAGE_CHANNELS))
        dims = self.projection_head.hidden_dims(self.encoder.output_dim)
        build_once(self.projection_head, (None, dims[0]))
        if self.supervised_head is not None:
            selected_dim = dims[self.ft_proj_selector]
            build_once(self.supervised_head, (None, selected_dim))

    def call(self, images, training=None) -> dict[str, tf.Tensor]:
        channels = images.shape[-1]
        if channels is None or channels % IMAGE_CHANNELS:
            raise ValueError(
                f"Received: images of shape {images.shape}. The model takes "
                "(B, H, W, 3 * views) images with the views side by side "
                "on the channel axis."
            )
        views = channels // IMAGE_CHANNELS
        if views > 1:
            # (B, H, W, 3v) -> (v * B, H, W, 3), view-major.
            images = tf.concat(tf.split(images, views, axis=-1), axis=0)
        outputs = dict(self.encoder(images, training=training))
        features = outputs["final_avg_pool"]  # (v * B, feature_dim)
        hiddens = self.projection_head(features, training=training)
        # hiddens[0] went through the head's autocast to the compute dtype;
        # the encoder output itself is the exact element 0.
        hiddens = [features, *hiddens[1:]]
        outputs["proj_head_input"] = features
        outputs["proj_head_output"] = hiddens[-1]
        if self.supervised_head is not None:
            selected = hiddens[self.ft_proj_selector]
            if self.stop_gradient_supervised:
                selected = tf.stop_gradient(selected)
            outputs["logits_sup"] = self.supervised_head(selected)
        return {k: tf.cast(v, tf.float32) for k, v in outputs.items()}

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "projection_head": keras.saving.serialize_keras_object(
                self.projection_head
            ),
            "supervised_head": (
                None
                if self.supervised_head is None
                else keras.saving.serialize_keras_object(self.supervised_head)
            ),
            "ft_proj_selector": self.ft_proj_selector,
            "num_views": self.num_views,
            "stop_gradient_supervised": self.stop_gradient_supervised,
        }
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("encoder", "projection_head", "supervised_head"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return cls(**config)
