"""A 2-D convolution whose kernel gradient is computed as matmuls.

oneDNN's bfloat16 kernel-gradient convolution (`Conv2DBackpropFilter`) is
slow on small feature maps with many channels: on a 2-core AVX512-BF16
CPU it runs the 4x4x512 convolutions of a CIFAR ResNet's last block
group at a quarter of the forward convolution's FLOP/s. The same
gradient is a sum over the k*k kernel taps of one matmul each,

    dW[i, j] = window_ij(x)^T @ dy,  window_ij(x)[n, h, w] =
               x_padded[n, s*h + i, s*w + j]   (M x C_in and M x C_out,
                                                M = N * H_out * W_out),

which oneDNN's matmul runs at about twice the speed there. `conv2d` is
the forward convolution with that kernel gradient (the input gradient is
TF's own); `Conv2DFixedPadding` uses it where it was measured faster.
"""

from __future__ import annotations

import tensorflow as tf

from simclr_tf import config as config_lib

# `Conv2DFixedPadding(weight_grad=...)` values (`--conv_weight_grad`).
WEIGHT_GRADS = config_lib.CONV_WEIGHT_GRADS
# `auto` uses the matmul kernel gradient for 3x3 convolutions whose output
# has at most this many positions per image (a CIFAR ResNet's block groups
# 3 and 4: 8x8 and 4x4). Measured per conv at batch 512 on a 2-core
# AVX512-BF16 CPU, oneDNN time / matmul time: bfloat16 4x4 stride 1
# 2.1-2.3, 8x8 stride 1 1.06-1.08, stride 2 to 4x4 2.4-3.0 and to 8x8
# 1.3-1.5, but 16x16 stride 1 0.6 and stride 2 to 16x16 0.9; float32
# 1.15-1.25 on 4x4 and 8x8. 1x1 convolutions stay with oneDNN (0.7).
AUTO_MAX_OUTPUT_POSITIONS = 64


def _taps(x_padded: tf.Tensor, k: int, stride: int, out_h: int, out_w: int):
    """The (N, out_h, out_w, C) window of each kernel tap, row-major."""
    if stride > 1:
        # Phase-split once, x[s*h + i] = phases[i % s][h + i // s], so
        # that each tap is a contiguous window (strided slices copy
        # slowly on CPU).
        n, h, w, c = x_padded.shape
        extra_h, extra_w = -h % stride, -w % stride
        if extra_h or extra_w:
            x_padded = tf.pad(
                x_padded, [[0, 0], [0, extra_h], [0, extra_w], [0, 0]]
            )
        h, w = h + extra_h, w + extra_w
        phases = tf.reshape(
            x_padded, [-1, h // stride, stride, w // stride, stride, c]
        )
        phases = tf.transpose(phases, [2, 4, 0, 1, 3, 5])
    taps = []
    for i in range(k):
        for j in range(k):
            if stride == 1:
                tap = x_padded[:, i : i + out_h, j : j + out_w, :]
            else:
                a, b = i // stride, j // stride
                tap = phases[i % stride, j % stride, :, a : a + out_h]
                tap = tap[:, :, b : b + out_w, :]
            taps.append(tap)
    return taps


def matmul_weight_grad(
    x_padded: tf.Tensor, dy: tf.Tensor, k: int, stride: int
) -> tf.Tensor:
    """Gradient of a VALID k x k convolution's kernel, as k*k matmuls.

    Args:
      x_padded: (N, H, W, C_in) input, already padded (static shape).
      dy: (N, H_out, W_out, C_out) gradient of the output (static shape).
      k: kernel size.
      stride: stride.

    Returns:
      (k, k, C_in, C_out) kernel gradient in `dy`'s dtype.
    """
    c_in, (_, out_h, out_w, c_out) = x_padded.shape[-1], dy.shape
    flat_dy = tf.reshape(dy, [-1, c_out])
    grads = [
        tf.matmul(tf.reshape(tap, [-1, c_in]), flat_dy, transpose_a=True)
        for tap in _taps(x_padded, k, stride, out_h, out_w)
    ]
    return tf.reshape(tf.stack(grads), [k, k, c_in, c_out])


def conv2d(
    x: tf.Tensor, kernel: tf.Tensor, stride: int, padding: str
) -> tf.Tensor:
    """`tf.nn.conv2d` with a matmul kernel gradient.

    The forward and input-gradient ops are TF's own (oneDNN), with "SAME"
    or "VALID" padding: explicit padding lists leave oneDNN for a slow
    bfloat16 path.

    Args:
      x: (N, H, W, C_in) input with static H, W, C_in.
      kernel: (k, k, C_in, C_out), x's dtype.
      stride: stride along H and W.
      padding: "SAME" (stride 1 only) or "VALID".

    Returns:
      `tf.nn.conv2d(x, kernel, stride, padding)`; its kernel gradient is
      `matmul_weight_grad`, its input gradient TF's `Conv2DBackpropInput`.
    """
    k = kernel.shape[0]
    if padding == "SAME" and stride != 1:
        raise ValueError("conv2d: SAME padding needs stride 1.")
    strides = [1, stride, stride, 1]

    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.nn.conv2d(x, kernel, strides, padding)

        def grad(dy):
            dx = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(x),
                filter=kernel,
                out_backprop=dy,
                strides=strides,
                padding=padding,
            )
            x_padded = x
            if padding == "SAME" and k > 1:  # TF's SAME at stride 1.
                pads = [(k - 1) // 2, k - 1 - (k - 1) // 2]
                x_padded = tf.pad(x, [[0, 0], pads, pads, [0, 0]])
            return dx, matmul_weight_grad(x_padded, dy, k, stride)

        return y, grad

    return conv(x, kernel)


def use_matmul_weight_grad(
    weight_grad: str, kernel_size: int, stride: int, input_shape
) -> bool:
    """Whether a conv layer takes `conv2d` (True) or TF's own conv.

    Args:
      weight_grad: one of `WEIGHT_GRADS`.
      kernel_size: k of the square kernel.
      stride: the conv's stride.
      input_shape: the NHWC input shape (H, W may be None).

    Returns:
      True for "matmul" with static H, W, C, and for "auto" where it was
      measured faster (3x3 with a small output, `AUTO_MAX_OUTPUT_POSITIONS`).
    """
    if weight_grad == "onednn" or None in tuple(input_shape)[1:]:
        return False
    if weight_grad == "matmul":
        return True
    out_positions = -(-input_shape[1] // stride) * -(-input_shape[2] // stride)
    return kernel_size == 3 and out_positions <= AUTO_MAX_OUTPUT_POSITIONS
