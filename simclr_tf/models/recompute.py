"""Conv/BN chains that keep fewer activations for the backward pass.

In a conv-BN-ReLU-conv chain TF keeps two activation-sized tensors per
BN-ReLU for the backward pass: the BN input z (for the BN gradient) and
the ReLU output a (for the ReLU gradient and the next conv's kernel
gradient). `bn_relu_branches` keeps z only and recomputes a = relu(bn(z))
from it in the backward pass (one fused batch norm and a ReLU: element
-wise work, a few percent of a step). Its convs ("branches") read a; a
branch may end in its own BN, as a projection shortcut's bn(conv(a)),
whose conv output is then recomputed too (a 1x1 conv, under 1 % of a
ResNet-18 step) instead of being kept for that BN's gradient. Without
the leading BN (`conv_bn`) the chain is just such a shortcut, on an input
the block's first conv keeps anyway. Values and gradients are those of
the plain chains.
"""

from __future__ import annotations

import tensorflow as tf

from simclr_tf.models import conv_grad
from simclr_tf.models.layers import (
    BatchNorm,
    Conv2DFixedPadding,
    fused_batch_norm,
)

_FUSABLE_DTYPES = (tf.float32, tf.bfloat16, tf.float16)


def bn_relu_branches(
    z: tf.Tensor,
    bn: BatchNorm | None,
    branches: list[tuple[Conv2DFixedPadding, BatchNorm | None]],
    training,
    recompute: bool = True,
) -> list[tf.Tensor]:
    """[conv(a) or post_bn(conv(a)) per branch], a = relu(bn(z, training))
    (a = z without `bn`), keeping only z for the backward pass.

    The recomputing path needs every batch norm on its fused training path
    (`BatchNorm._fused_training`: local statistics) and convs that take
    `conv_grad.conv2d` (`Conv2DFixedPadding.custom_backward`, i.e. not
    `backward="tf"`); otherwise, and with `recompute` False, this is the
    plain chain of layer calls. Call it inside the owning layer's `call`
    (layers built); the moving statistics are updated either way.

    Args:
      z: (N, H, W, C) input, the compute dtype.
      bn: the batch norm before the ReLU, or None (a = z).
      branches: (conv, batch norm after it or None) per output.
      training: the training flag passed to the batch norms.
      recompute: False forces the plain chain.

    Returns:
      One output per branch.
    """
    norms = [n for n in [bn, *(post for _, post in branches)] if n is not None]
    matmuls = None
    if recompute and z.dtype in _FUSABLE_DTYPES:
        # Every BN here sees a tensor of z's rank with known channels: all
        # that its check reads.
        if all(n._fused_training(z, training, None) for n in norms):
            matmuls = [c.custom_backward(z.shape, z.dtype) for c, _ in branches]
    if matmuls is None or None in matmuls:
        a = z if bn is None else tf.nn.relu(bn(z, training=training))
        return [
            conv(a) if post is None else post(conv(a), training=training)
            for conv, post in branches
        ]

    def activation(z, scale, offset):
        y, mean, variance = fused_batch_norm(z, scale, offset, bn.epsilon)
        return tf.nn.relu(y), [mean, variance]

    def conv_forward(a, kernel, conv):
        return conv_grad.conv2d_forward(
            a, kernel, conv.strides[0], conv.conv_pads()
        )

    def branch(a, kernel, norm, conv, post):
        c = conv_forward(a, kernel, conv)
        if post is None:
            return c, []
        y, mean, variance = fused_batch_norm(c, *norm, post.epsilon)
        return y, [mean, variance]

    # Flat inputs of the custom gradient: z, the leading BN's (scale,
    # offset), then per branch its kernel and its BN's (scale, offset).
    pre = [] if bn is None else list(bn.scale_and_offset(z.shape[-1]))
    params = []
    for conv, post in branches:
        params.append(tf.cast(conv.kernel, z.dtype))
        if post is not None:
            params.extend(post.scale_and_offset(conv.filters))

    def split(params):
        """Per branch (kernel, [scale, offset] or [])."""
        out, i = [], 0
        for _, post in branches:
            n = 1 if post is None else 3
            out.append((params[i], params[i + 1 : i + n]))
            i += n
        return out

    num_pre = len(pre)

    @tf.custom_gradient
    def chain(z, *flat):
        pre, params = flat[:num_pre], flat[num_pre:]
        a, statistics = (z, []) if bn is None else activation(z, *pre)
        outputs = []
        for (kernel, norm), (conv, post) in zip(
            split(params), branches, strict=True
        ):
            y, branch_statistics = branch(a, kernel, norm, conv, post)
            outputs.append(y)
            statistics += branch_statistics

        def grad(*dys):
            dys = dys[: len(branches)]  # The statistics have no gradient.
            # Waiting for the output gradients keeps the executor from
            # recomputing early (in the forward pass).
            with tf.control_dependencies(dys), tf.GradientTape() as tape:
                tape.watch([z, *pre])
                a = z if bn is None else activation(z, *pre)[0]
            das, dparams = [], []
            for dy, (kernel, norm), (conv, post), matmul in zip(
                dys, split(params), branches, matmuls, strict=True
            ):
                dnorm = []
                if post is not None:
                    with tf.control_dependencies([dy]):
                        c = conv_forward(a, kernel, conv)
                    with tf.GradientTape() as post_tape:
                        post_tape.watch([c, *norm])
                        y = fused_batch_norm(c, *norm, post.epsilon)[0]
                    dy, *dnorm = post_tape.gradient(
                        y, [c, *norm], output_gradients=dy
                    )
                da, dk = conv_grad.conv2d_backward(
                    a, kernel, dy, conv.strides[0], conv.conv_pads(), matmul
                )
                das.append(da)
                dparams += [dk, *dnorm]
            da = das[0] if len(das) == 1 else tf.add_n(das)
            if bn is None:
                return [da, *dparams]
            return [*tape.gradient(a, [z, *pre], output_gradients=da), *dparams]

        return (*outputs, *statistics), grad

    results = chain(z, *pre, *params)
    outputs, statistics = results[: len(branches)], results[len(branches) :]
    for norm in norms:
        norm._update_moving_statistics(statistics[0], statistics[1])
        statistics = statistics[2:]
    return list(outputs)


def bn_relu_conv(
    z: tf.Tensor,
    bn: BatchNorm,
    conv: Conv2DFixedPadding,
    training,
    recompute: bool = True,
) -> tf.Tensor:
    """`conv(relu(bn(z, training)))` keeping only z (`bn_relu_branches`)."""
    return bn_relu_branches(z, bn, [(conv, None)], training, recompute)[0]


def conv_bn(
    x: tf.Tensor,
    conv: Conv2DFixedPadding,
    bn: BatchNorm,
    training,
    recompute: bool = True,
) -> tf.Tensor:
    """`bn(conv(x), training)` keeping only x (`bn_relu_branches`): a
    projection shortcut, whose input the block's first conv keeps."""
    return bn_relu_branches(x, None, [(conv, bn)], training, recompute)[0]
