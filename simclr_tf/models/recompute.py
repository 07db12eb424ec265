"""Conv/BN chains that keep fewer activations for the backward pass.

In a conv-BN-ReLU-conv chain TF keeps two activation-sized tensors per
BN-ReLU for the backward pass: the BN input z (for the BN gradient) and
the ReLU output a (for the ReLU gradient and the next conv's kernel
gradient). `bn_relu_conv` keeps z only and recomputes a = relu(bn(z))
from it in the backward pass (one fused batch norm and a ReLU: element
-wise work, a few percent of a step), which removes one stored tensor per
residual block. `conv_bn` is a projection shortcut's bn(conv(x)): it
keeps only x, which the block's first conv keeps anyway, and recomputes
the conv output (a 1x1 conv, under 1 % of a ResNet-18 step) instead of
keeping it for the BN gradient. Values and gradients are those of the
plain chains.
"""

from __future__ import annotations

import tensorflow as tf

from simclr_tf.models import conv_grad
from simclr_tf.models.layers import (
    BatchNorm,
    Conv2DFixedPadding,
    fused_batch_norm,
)


def _recomputing_backward(x, bn, conv, training, recompute) -> bool | None:
    """`conv.custom_backward` for input x when a chain of `bn` and `conv`
    can recompute (fused local-statistics training BN, a `conv_grad`
    conv), else None. x: the conv's input (or BN's: the same rank and
    channel axis is all BN's check reads)."""
    if not recompute or x.dtype not in (tf.float32, tf.bfloat16, tf.float16):
        return None
    matmul = conv.custom_backward(x.shape, x.dtype)
    if matmul is None or not bn._fused_training(x, training, None):
        return None
    return matmul


def bn_relu_conv(
    z: tf.Tensor,
    bn: BatchNorm,
    conv: Conv2DFixedPadding,
    training,
    recompute: bool = True,
) -> tf.Tensor:
    """`conv(relu(bn(z, training)))`, recomputing BN-ReLU when it can.

    The recomputing path needs the fused training batch norm
    (`BatchNorm._fused_training`: local statistics) and a conv that takes
    `conv_grad.conv2d` (`Conv2DFixedPadding.custom_backward`, i.e. not
    `backward="tf"`); otherwise, and with `recompute` False, this is the
    plain chain of layer calls. Call it inside the owning layer's `call`
    (both layers built); BN's moving statistics are updated either way.

    Args:
      z: (N, H, W, C) BN input, the compute dtype.
      bn: the batch norm.
      conv: the conv after the ReLU.
      training: the training flag passed to `bn`.
      recompute: False forces the plain chain.

    Returns:
      The conv output.
    """
    matmul = _recomputing_backward(z, bn, conv, training, recompute)
    if matmul is None:
        return conv(tf.nn.relu(bn(z, training=training)))
    scale, offset = bn.scale_and_offset(z.shape[-1])
    kernel = tf.cast(conv.kernel, z.dtype)
    stride, pads, epsilon = conv.strides[0], conv.conv_pads(), bn.epsilon

    def bn_relu(z, scale, offset):
        y, mean, variance = fused_batch_norm(z, scale, offset, epsilon)
        return tf.nn.relu(y), mean, variance

    @tf.custom_gradient
    def chain(z, scale, offset, kernel):
        a, mean, variance = bn_relu(z, scale, offset)
        y = conv_grad.conv2d_forward(a, kernel, stride, pads)

        def grad(dy, *unused_statistics_grads):
            # Waiting for dy keeps the executor from recomputing early.
            with tf.control_dependencies([dy]), tf.GradientTape() as tape:
                tape.watch([z, scale, offset])
                a, _, _ = bn_relu(z, scale, offset)
            da, dk = conv_grad.conv2d_backward(
                a, kernel, dy, stride, pads, matmul
            )
            dz, dscale, doffset = tape.gradient(
                a, [z, scale, offset], output_gradients=da
            )
            return dz, dscale, doffset, dk

        return (y, mean, variance), grad

    y, mean, variance = chain(z, scale, offset, kernel)
    bn._update_moving_statistics(mean, variance)
    return y


def conv_bn(
    x: tf.Tensor,
    conv: Conv2DFixedPadding,
    bn: BatchNorm,
    training,
    recompute: bool = True,
) -> tf.Tensor:
    """`bn(conv(x), training)`, recomputing the conv output when it can.

    For a projection shortcut, whose input the block's first conv keeps
    for its own gradient: the conv output is recomputed from x in the
    backward pass instead of being kept for the BN gradient. Conditions
    and fallback as `bn_relu_conv`'s.

    Args:
      x: (N, H, W, C_in) conv input, the compute dtype.
      conv: the conv.
      bn: the batch norm after it.
      training: the training flag passed to `bn`.
      recompute: False forces the plain chain.

    Returns:
      The batch norm's output.
    """
    matmul = _recomputing_backward(x, bn, conv, training, recompute)
    if matmul is None:
        return bn(conv(x), training=training)
    scale, offset = bn.scale_and_offset(conv.filters)
    kernel = tf.cast(conv.kernel, x.dtype)
    stride, pads, epsilon = conv.strides[0], conv.conv_pads(), bn.epsilon

    @tf.custom_gradient
    def chain(x, kernel, scale, offset):
        c = conv_grad.conv2d_forward(x, kernel, stride, pads)
        y, mean, variance = fused_batch_norm(c, scale, offset, epsilon)

        def grad(dy, *unused_statistics_grads):
            # Waiting for dy keeps the executor from recomputing early.
            with tf.control_dependencies([dy]):
                c = conv_grad.conv2d_forward(x, kernel, stride, pads)
            with tf.GradientTape() as tape:
                tape.watch([c, scale, offset])
                y, _, _ = fused_batch_norm(c, scale, offset, epsilon)
            dc, dscale, doffset = tape.gradient(
                y, [c, scale, offset], output_gradients=dy
            )
            dx, dk = conv_grad.conv2d_backward(
                x, kernel, dc, stride, pads, matmul
            )
            return dx, dk, dscale, doffset

        return (y, mean, variance), grad

    y, mean, variance = chain(x, kernel, scale, offset)
    bn._update_moving_statistics(mean, variance)
    return y
