"""The layers ResNet blocks are made of (SPEC.md §3), as Keras 3 layers.

Batch norm with the reference's settings and a fused training path, the
reference's "fixed padding" convolution, selective kernels (SimCLRv2,
arXiv:1903.06586) and squeeze-excitation (arXiv:1709.01507), and the
helpers that build sublayers once and keep them trackable. The blocks,
stems and the network are in `simclr_tf.models.resnet`.

All tensors are NHWC. Layers follow the global Keras dtype policy.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf.models import conv_grad

# SPEC.md §3 / reference `BATCH_NORM_EPSILON`.
BATCH_NORM_EPSILON = 1e-5
# Smallest width of the selective-kernel mixing layer (reference `min_dim`).
SK_MIN_DIM = 32

_register = keras.saving.register_keras_serializable(package="simclr_tf")


def conv_initializer() -> keras.initializers.Initializer:
    """He-style init of every conv kernel (reference `VarianceScaling()`)."""
    return keras.initializers.VarianceScaling(
        scale=1.0, mode="fan_in", distribution="truncated_normal"
    )


@_register
class BatchNorm(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` with a fused training path.

    Keras 3 normalises with separate element-wise ops (moments, then
    scale and shift, in float32 even under a bfloat16 policy), each
    keeping its own activation-sized tensors for the backward pass. When
    the statistics are those of the local batch anyway — not synchronised,
    or synchronised over a single replica — and the input is NHWC, the
    training forward and backward here are one `FusedBatchNormV3` op and
    its gradient (oneDNN on CPU), in the compute dtype. The result is the
    same function: batch mean and biased variance normalise the batch and
    update the moving statistics exactly as the Keras layer does.
    Everything else (inference, synchronised statistics over several
    replicas, masks, renorm, other ranks) is the Keras layer's own path,
    except that synchronised statistics over a single replica are
    computed locally (`_moments`), and so is everything when
    `fused_training` is False (`set_fused_training`, for comparisons).

    Moving statistics on several replicas without synchronisation: Keras 3
    variables are not aggregated, so each replica would update its own
    copy from its own batch and a checkpoint or export would keep replica
    0's. Here the new batch statistics are averaged over the replicas (one
    small all-reduce per layer and step) before the update, so every copy
    holds the mean of the replicas' moving statistics — what the
    reference's Keras 2 layer saves, evaluates and exports (ON_READ
    variables with MEAN aggregation; by linearity of the update the two
    agree). The batch itself is still normalised by its local statistics.
    """

    # Whether training may take the fused path (read when a step is traced).
    fused_training = True

    def _local_statistics(self) -> bool:
        """True when the batch statistics are the local batch's."""
        if not self.synchronized:
            return True
        context = tf.distribute.get_replica_context()
        return context is None or context.num_replicas_in_sync == 1

    def _fused_training(self, inputs, training, mask) -> bool:
        if not self.fused_training:
            return False
        if not (training and self.trainable) or mask is not None:
            return False
        if self.renorm or len(inputs.shape) != 4:
            return False
        if self.axis not in (-1, 3) or inputs.shape[-1] is None:
            return False
        return self._local_statistics()

    def _moments(self, inputs, mask):
        # Keras's synchronised moments all-reduce even over one replica,
        # through a `tf.custom_gradient` whose gradient function holds
        # another one: a SavedModel cannot save that nested gradient, and
        # every load then warns that gradients "will likely fail" (they
        # do not). Local statistics need no all-reduce at all.
        if mask is None and self.synchronized and self._local_statistics():
            return keras.ops.moments(
                inputs, axes=self._reduction_axes, synchronized=False
            )
        return super()._moments(inputs, mask)

    def _replicas_to_average(self, training) -> bool:
        """True if the moving statistics need averaging over replicas."""
        if not (training and self.trainable) or self.synchronized:
            return False
        context = tf.distribute.get_replica_context()
        return context is not None and context.num_replicas_in_sync > 1

    def _update_moving_statistics(self, mean, variance) -> None:
        """EMA update with the batch statistics, averaged over replicas."""
        if self._replicas_to_average(training=True):
            context = tf.distribute.get_replica_context()
            mean, variance = context.all_reduce(
                tf.distribute.ReduceOp.MEAN, [mean, variance]
            )
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
        self.moving_variance.assign(
            self.moving_variance * m + variance * (1.0 - m)
        )

    def _local_training(self, inputs):
        """The Keras training path with the replica-averaged update."""
        x = tf.cast(inputs, tf.float32)  # As Keras: statistics in float32.
        rank = len(x.shape)
        axis = self.axis % rank
        reduction_axes = [i for i in range(rank) if i != axis]
        mean, variance = tf.nn.moments(x, reduction_axes)
        shape = [1] * rank
        shape[axis] = x.shape[axis]
        y = tf.nn.batch_normalization(
            x,
            tf.reshape(mean, shape),
            tf.reshape(variance, shape),
            tf.reshape(tf.cast(self.beta, tf.float32), shape)
            if self.center
            else None,
            tf.reshape(tf.cast(self.gamma, tf.float32), shape)
            if self.scale
            else None,
            self.epsilon,
        )
        self._update_moving_statistics(mean, variance)
        return tf.cast(y, self.compute_dtype)

    def call(self, inputs, training=None, mask=None):
        if not self._fused_training(inputs, training, mask):
            if (
                mask is None
                and not self.renorm
                and self._replicas_to_average(training)
            ):
                return self._local_training(inputs)
            return super().call(inputs, training=training, mask=mask)
        x = tf.convert_to_tensor(inputs)
        if x.dtype not in (tf.float32, tf.bfloat16, tf.float16):
            x = tf.cast(x, tf.float32)
        scale, offset = self.scale_and_offset(x.shape[-1])
        y, mean, variance = fused_batch_norm(x, scale, offset, self.epsilon)
        self._update_moving_statistics(mean, variance)
        return tf.cast(y, self.compute_dtype)

    def scale_and_offset(self, channels: int) -> tuple[tf.Tensor, tf.Tensor]:
        """gamma and beta as float32 (ones / zeros when not learned)."""
        scale = (
            tf.cast(self.gamma, tf.float32)
            if self.scale
            else tf.ones([channels], tf.float32)
        )
        offset = (
            tf.cast(self.beta, tf.float32)
            if self.center
            else tf.zeros([channels], tf.float32)
        )
        return scale, offset


def fused_batch_norm(x, scale, offset, epsilon: float):
    """Training-mode batch norm of NHWC `x` as one fused op.

    Returns:
      (normalised x in x's dtype, batch mean, biased batch variance); the
      statistics are (C,) float32.
    """
    # variance comes with Bessel's correction n / (n - 1).
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        x, scale, offset, epsilon=epsilon, is_training=True
    )
    n = tf.cast(tf.size(x) // x.shape[-1], tf.float32)
    return y, mean, variance * ((n - 1.0) / tf.maximum(n, 1.0))


def set_fused_training(model: keras.layers.Layer, enabled: bool) -> int:
    """Turns the fused training path of every `BatchNorm` in `model` on or
    off (off: Keras 3's own batch norm, e.g. to measure what fusing gains).

    Takes effect for steps traced afterwards.

    Args:
      model: a layer or model; its `BatchNorm` sublayers are switched.
      enabled: True for the fused path where it applies (the default).

    Returns:
      The number of `BatchNorm` layers switched.
    """
    # Keras 3 has no public recursive layer walk (as in `lars.py`).
    walk = model._flatten_layers(include_self=True, recursive=True)
    bns = [layer for layer in walk if isinstance(layer, BatchNorm)]
    for bn in bns:
        bn.fused_training = enabled
    return len(bns)


def batch_norm(
    batch_norm_decay: float,
    global_bn: bool,
    zero_gamma: bool = False,
    center: bool = True,
    name: str | None = None,
) -> BatchNorm:
    """A BN layer with the reference's settings (SPEC.md §3).

    Args:
      batch_norm_decay: momentum of the moving statistics.
      global_bn: synchronise the batch statistics across replicas.
      zero_gamma: start with gamma = 0 (the last BN of a residual block).
      center: learn a beta offset.
      name: layer name.

    Returns:
      A `BatchNorm` (a `keras.layers.BatchNormalization`) over the last
      axis.
    """
    return BatchNorm(
        momentum=batch_norm_decay,
        epsilon=BATCH_NORM_EPSILON,
        center=center,
        gamma_initializer="zeros" if zero_gamma else "ones",
        synchronized=global_bn,
        name=name,
    )


def build_once(layer: keras.layers.Layer, input_shape) -> None:
    """Builds `layer` unless it is built (e.g. deserialised with weights)."""
    if not layer.built:
        layer.build(input_shape)


def set_layer_attributes(
    owner: keras.layers.Layer, layers: list[keras.layers.Layer]
) -> tuple[str, ...]:
    """Sets each layer as an attribute of `owner` named by its layer name.

    Lists of layers are invisible to `tf.train.Checkpoint` in Keras 3 (a
    Keras `TrackedList` is not a TF trackable), so sublayers kept in a list
    would be missing from checkpoints. Attributes are tracked by both.

    Returns:
      The attribute names, in order.
    """
    for layer in layers:
        setattr(owner, layer.name, layer)
    return tuple(layer.name for layer in layers)


def _channels(shape, channels: int) -> tuple:
    return (*tuple(shape)[:-1], channels)


@_register
class Conv2DFixedPadding(keras.layers.Conv2D):
    """Bias-free conv; strided ones pad explicitly, then use VALID.

    With stride 1 this is a SAME conv. With stride s > 1 the input is padded
    by `k - 1` in total, `(k - 1) // 2` before (reference `FixedPadding`),
    whatever the input size (TF's SAME pads (0, 1) for an even input and a
    3x3 stride-2 conv, shifting the sampling grid).

    Args:
      filters: output channels.
      kernel_size: square kernel size k.
      strides: stride s.
      backward: how the gradients are computed (same function): "tf" is
        TF's own conv gradient; "auto" is `conv_grad.conv2d` (padding
        recomputed in the backward pass) with the matmul kernel gradient
        where `conv_grad.use_matmul_weight_grad`; "matmul" uses the
        matmul kernel gradient everywhere.
      **kwargs: passed to `keras.layers.Conv2D` (`padding` is derived).
    """

    def __init__(
        self,
        filters: int,
        kernel_size,
        strides=1,
        backward: str = "auto",
        **kwargs,
    ):
        if backward not in conv_grad.BACKWARDS:
            raise ValueError(
                f"Received: backward={backward!r}. Use one of "
                f"{', '.join(conv_grad.BACKWARDS)}."
            )
        kwargs.pop("padding", None)
        kwargs.setdefault("use_bias", False)
        kwargs.setdefault("kernel_initializer", conv_initializer())
        stride = strides if isinstance(strides, int) else strides[0]
        super().__init__(
            filters=filters,
            kernel_size=kernel_size,
            strides=strides,
            padding="same" if stride == 1 else "valid",
            **kwargs,
        )
        self.backward = backward
        pad_total = self.kernel_size[0] - 1 if stride > 1 else 0
        self._pads = (pad_total // 2, pad_total - pad_total // 2)

    def custom_backward(self, input_shape, dtype) -> bool | None:
        """None: TF's own conv; else whether `conv_grad.conv2d` (with
        this padding, `conv_pads`) takes the matmul kernel gradient for
        an input of this shape and compute dtype."""
        k = self.kernel_size[0]
        plain = self.dilation_rate == (1, 1) and self.groups == 1
        if self.backward == "tf" or self.use_bias or not plain:
            return None
        if self.kernel_size[1] != k or None in tuple(input_shape)[1:]:
            return None
        return self.backward == "matmul" or conv_grad.use_matmul_weight_grad(
            k, self.strides[0], input_shape, dtype
        )

    def conv_pads(self) -> tuple[int, int]:
        """(before, after) zeros this conv adds along H and W."""
        if self.strides[0] == 1:
            return conv_grad.same_pads(self.kernel_size[0])
        return self._pads

    def call(self, inputs):
        matmul = self.custom_backward(inputs.shape, inputs.dtype)
        # Unpadded with oneDNN's kernel gradient, conv2d is TF's own conv.
        if matmul or (matmul is not None and any(self._pads)):
            kernel = tf.cast(self.kernel, inputs.dtype)
            return conv_grad.conv2d(
                inputs, kernel, self.strides[0], self.conv_pads(), matmul
            )
        if self._pads[1]:
            inputs = tf.pad(inputs, [[0, 0], self._pads, self._pads, [0, 0]])
        return super().call(inputs)

    def compute_output_shape(self, input_shape):
        padded = list(input_shape)
        for axis in (1, 2):
            if padded[axis] is not None:
                padded[axis] += sum(self._pads)
        return super().compute_output_shape(tuple(padded))

    def get_config(self):
        return {**super().get_config(), "backward": self.backward}


@_register
class SelectiveKernelConv(keras.layers.Layer):
    """Selective-kernel 3x3 conv with its BN-ReLU (reference `SK_Conv2D`).

    One 3x3 conv makes two branches of `filters` channels; their sum is
    pooled globally and mapped (1x1 conv to max(filters * sk_ratio, 32),
    BN-ReLU, 1x1 conv to 2 * filters) to per-channel mixing weights,
    softmax-normalised over the two branches.

    Args:
      filters: output channels.
      strides: stride of the 3x3 conv.
      sk_ratio: width of the mixing layer relative to `filters`.
      batch_norm_decay: BN momentum.
      global_bn: synchronised BN.
      **kwargs: base layer arguments (`name`, `dtype`, ...).
    """

    def __init__(
        self,
        filters: int,
        strides: int,
        sk_ratio: float,
        batch_norm_decay: float = 0.9,
        global_bn: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides
        self.sk_ratio = sk_ratio
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.conv = Conv2DFixedPadding(2 * filters, 3, strides, name="conv")
        self.bn = batch_norm(batch_norm_decay, global_bn, name="bn")
        mid_dim = max(int(filters * sk_ratio), SK_MIN_DIM)
        self.mix_conv0 = keras.layers.Conv2D(
            mid_dim,
            1,
            use_bias=False,
            kernel_initializer=conv_initializer(),
            name="mix_conv0",
        )
        self.mix_bn = batch_norm(batch_norm_decay, global_bn, name="mix_bn")
        self.mix_conv1 = keras.layers.Conv2D(
            2 * filters,
            1,
            use_bias=False,
            kernel_initializer=conv_initializer(),
            name="mix_conv1",
        )

    def build(self, input_shape):
        build_once(self.conv, input_shape)
        build_once(self.bn, _channels(input_shape, 2 * self.filters))
        pooled = (input_shape[0], 1, 1, self.filters)
        build_once(self.mix_conv0, pooled)
        build_once(self.mix_bn, _channels(pooled, self.mix_conv0.filters))
        build_once(self.mix_conv1, _channels(pooled, self.mix_conv0.filters))

    def call(self, inputs, training=None):
        x = tf.nn.relu(self.bn(self.conv(inputs), training=training))
        a, b = tf.split(x, 2, axis=-1)  # 2 x (N, H, W, filters)
        pooled = tf.reduce_mean(a + b, axis=[1, 2], keepdims=True)
        mix = tf.nn.relu(self.mix_bn(self.mix_conv0(pooled), training=training))
        m_a, m_b = tf.split(self.mix_conv1(mix), 2, axis=-1)  # (N,1,1,f)
        # softmax over the 2 branches == [sigmoid(m_a - m_b), its complement].
        w_a = tf.sigmoid(m_a - m_b)
        return b + (a - b) * w_a

    def compute_output_shape(self, input_shape):
        shape = self.conv.compute_output_shape(input_shape)
        return _channels(shape, self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "strides": self.strides,
            "sk_ratio": self.sk_ratio,
            "batch_norm_decay": self.batch_norm_decay,
            "global_bn": self.global_bn,
        }


@_register
class SqueezeExcitation(keras.layers.Layer):
    """Channel gating x * sigmoid(W2 relu(W1 mean_hw(x))) (reference SE).

    Args:
      filters: channels of the input and output.
      reduced_filters: width of the bottleneck W1 (reference:
        max(1, int(block_filters * se_ratio))).
      **kwargs: base layer arguments.
    """

    def __init__(self, filters: int, reduced_filters: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.reduced_filters = reduced_filters
        self.reduce = keras.layers.Conv2D(
            reduced_filters,
            1,
            kernel_initializer=conv_initializer(),
            name="reduce",
        )
        self.expand = keras.layers.Conv2D(
            filters, 1, kernel_initializer=conv_initializer(), name="expand"
        )

    def build(self, input_shape):
        pooled = (input_shape[0], 1, 1, input_shape[-1])
        build_once(self.reduce, pooled)
        build_once(self.expand, _channels(pooled, self.reduced_filters))

    def call(self, inputs):
        se = tf.reduce_mean(inputs, axis=[1, 2], keepdims=True)
        se = self.expand(tf.nn.relu(self.reduce(se)))
        return tf.sigmoid(se) * inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "reduced_filters": self.reduced_filters,
        }
