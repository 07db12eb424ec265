"""A 2-D convolution whose kernel gradient is computed as matmuls.

oneDNN's bfloat16 kernel-gradient convolution (`Conv2DBackpropFilter`) is
slow on small feature maps with many channels: on a 2-core AVX512-BF16
CPU it runs the 4x4x512 convolutions of a CIFAR ResNet's last block
group at a quarter of the forward convolution's FLOP/s. The same
gradient is a sum over the k*k kernel taps of one matmul each,

    dW[i, j] = window_ij(x)^T @ dy,  window_ij(x)[n, h, w] =
               x_padded[n, s*h + i, s*w + j]   (M x C_in and M x C_out,
                                                M = N * H_out * W_out),

which oneDNN's matmul runs at about twice the speed there; restricted to
the outputs whose tap reads real input (the rows and columns of dy that
meet padding add nothing), each matmul skips the padding's products.
`conv2d` is the forward convolution with that kernel gradient (the input
gradient is TF's own); `Conv2DFixedPadding` uses it where it was measured
faster. `conv2d` also keeps only the unpadded input of a padded (strided)
convolution for the backward pass, and recomputes the padding there.
"""

from __future__ import annotations

import tensorflow as tf

from simclr_tf import config as config_lib

# `Conv2DFixedPadding(backward=...)` values (`--conv_backward`): "tf" is
# TensorFlow's own conv gradient; "auto" is `conv2d` (padding recomputed
# in the backward pass) with the matmul kernel gradient where
# `use_matmul_weight_grad`, oneDNN's elsewhere; "matmul" is `conv2d` with
# the matmul kernel gradient everywhere.
BACKWARDS = config_lib.CONV_BACKWARDS
# `auto` uses the matmul kernel gradient for 3x3 convolutions whose output
# has at most this many positions per image (a CIFAR ResNet's block groups
# 3 and 4: 8x8 and 4x4), in bfloat16/float16 and for strided ones in
# float32; stride-1 ones in float32 only up to
# `AUTO_FLOAT32_MAX_OUTPUT_POSITIONS` (4x4). Measured per conv at batch 512
# on a 2-core AVX512-BF16 CPU, oneDNN time / matmul time: bfloat16
# stride 1 4x4 2.8 (against oneDNN's SAME-padded gradient), 8x8 1.24,
# 16x16 0.73; stride 2 to 4x4 3.3, to 8x8 1.4, to 16x16 0.84; float32
# stride 1 4x4 1.26-1.33, 8x8 0.79-0.83 (oneDNN's SAME gradient wins),
# stride 2 to 4x4 1.45, to 8x8 0.99. 1x1 convolutions stay with oneDNN
# (0.7).
AUTO_MAX_OUTPUT_POSITIONS = 64
AUTO_FLOAT32_MAX_OUTPUT_POSITIONS = 16


def _phases(x: tf.Tensor, stride: int) -> tf.Tensor:
    """x, or its stride x stride phases: x[:, s*h + r, s*w + q] is
    phases[r, q, :, h, w]."""
    if stride == 1:
        return x
    # Phase-split once so that each tap's window is a contiguous slice
    # (strided slices copy slowly on CPU).
    _, h, w, c = x.shape
    extra_h, extra_w = -h % stride, -w % stride
    if extra_h or extra_w:
        x = tf.pad(x, [[0, 0], [0, extra_h], [0, extra_w], [0, 0]])
    h, w = h + extra_h, w + extra_w
    phases = tf.reshape(x, [-1, h // stride, stride, w // stride, stride, c])
    return tf.transpose(phases, [2, 4, 0, 1, 3, 5])


def _tap_range(tap: int, size: int, out: int, stride: int, before: int):
    """Along one axis: the outputs [lo, hi) whose input for kernel tap `tap`
    is real (not padding), and that input's phase and offset: output o
    reads input s*o + t = s*(o + shift) + phase, t = tap - before."""
    t = tap - before
    lo = max(0, -(t // stride))
    hi = min(out, (size - 1 - t) // stride + 1)
    return lo, hi, t % stride, t // stride


def matmul_weight_grad(
    x: tf.Tensor, dy: tf.Tensor, k: int, stride: int, pad_before: int
) -> tf.Tensor:
    """Gradient of a padded k x k convolution's kernel, as k*k matmuls.

    Each tap's matmul covers only the outputs whose input is real, so no
    product with the zero padding is computed (31 % of the products of a
    3x3 conv at 4x4, 16 % at 8x8), and no padded copy of `x` is made.

    Inside a `tf.function` the window copies wait for `dy` and for the
    previous tap's matmul: left free, the executor would make them as soon
    as `x` exists (all of them, in the forward pass).

    Args:
      x: (N, H, W, C_in) unpadded input (static shape).
      dy: (N, H_out, W_out, C_out) gradient of the output (static shape).
      k: kernel size.
      stride: stride.
      pad_before: zeros before the input along H and along W (those after
        follow from the output's size).

    Returns:
      (k, k, C_in, C_out) kernel gradient in `dy`'s dtype.
    """
    _, height, width, c_in = x.shape
    _, out_h, out_w, c_out = dy.shape
    with tf.control_dependencies([dy]):
        source = _phases(x, stride)
    grads = [dy]
    for i in range(k):
        h_lo, h_hi, h_phase, h_shift = _tap_range(
            i, height, out_h, stride, pad_before
        )
        for j in range(k):
            w_lo, w_hi, w_phase, w_shift = _tap_range(
                j, width, out_w, stride, pad_before
            )
            with tf.control_dependencies(grads[-1:]):
                rows = slice(h_lo + h_shift, h_hi + h_shift)
                cols = slice(w_lo + w_shift, w_hi + w_shift)
                if stride == 1:
                    window = source[:, rows, cols, :]
                else:
                    window = source[h_phase, w_phase, :, rows][:, :, cols]
                dy_window = dy[:, h_lo:h_hi, w_lo:w_hi, :]
            grads.append(
                tf.matmul(
                    tf.reshape(window, [-1, c_in]),
                    tf.reshape(dy_window, [-1, c_out]),
                    transpose_a=True,
                )
            )
    return tf.reshape(tf.stack(grads[1:]), [k, k, c_in, c_out])


def same_pads(k: int) -> tuple[int, int]:
    """TF's SAME padding (before, after) of a stride-1 k x k conv."""
    return (k - 1) // 2, k - 1 - (k - 1) // 2


def _paddings(pads: tuple[int, int]) -> list[list[int]]:
    return [[0, 0], list(pads), list(pads), [0, 0]]


def conv2d_forward(x, kernel, stride: int, pads: tuple[int, int]):
    """The padded convolution with TF's (oneDNN's) own ops.

    Explicit padding lists leave oneDNN for a slow bfloat16 path, so the
    input is padded with `tf.pad` and convolved VALID (SAME at stride 1
    when the pads are SAME's).
    """
    k = kernel.shape[0]
    if stride == 1 and tuple(pads) == same_pads(k):
        return tf.nn.conv2d(x, kernel, 1, "SAME")
    if any(pads):
        x = tf.pad(x, _paddings(pads))
    return tf.nn.conv2d(x, kernel, stride, "VALID")


def conv2d_backward(x, kernel, dy, stride: int, pads, matmul: bool):
    """(input gradient, kernel gradient) of `conv2d_forward`.

    The padded input is recomputed here, not kept from the forward pass.
    The kernel gradient is `matmul_weight_grad` or oneDNN's
    `Conv2DBackpropFilter` (`matmul` False): at stride 1 with SAME's pads
    on the unpadded input with SAME padding (10-20 % faster than VALID on
    a padded copy: bfloat16 16x16, float32 everywhere).
    """
    k = kernel.shape[0]
    strides = [1, stride, stride, 1]
    same = stride == 1 and tuple(pads) == same_pads(k)
    if same or not any(pads):
        x_padded, padding = x, "SAME" if same else "VALID"
    else:
        with tf.control_dependencies([dy]):  # Not in the forward pass.
            x_padded, padding = tf.pad(x, _paddings(pads)), "VALID"
    dx = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=tf.shape(x_padded),
        filter=kernel,
        out_backprop=dy,
        strides=strides,
        padding=padding,
    )
    if x_padded is not x:
        height, width = x.shape[1], x.shape[2]
        dx = dx[:, pads[0] : pads[0] + height, pads[0] : pads[0] + width]
    if matmul:
        return dx, matmul_weight_grad(x, dy, k, stride, pads[0])
    dk = tf.raw_ops.Conv2DBackpropFilter(
        input=x_padded,
        filter_sizes=tf.shape(kernel),
        out_backprop=dy,
        strides=strides,
        padding=padding,
    )
    return dx, dk


def conv2d(
    x: tf.Tensor,
    kernel: tf.Tensor,
    stride: int,
    pads: tuple[int, int],
    matmul: bool = True,
) -> tf.Tensor:
    """A padded convolution that keeps only its unpadded input.

    Args:
      x: (N, H, W, C_in) input with static H, W, C_in.
      kernel: (k, k, C_in, C_out), x's dtype.
      stride: stride along H and W.
      pads: zeros (before, after) added along H and along W.
      matmul: kernel gradient by `matmul_weight_grad` (else oneDNN's).

    Returns:
      `tf.nn.conv2d` of the padded input, VALID; its gradients are
      `conv2d_backward`'s (TF's `Conv2DBackpropInput`, the chosen kernel
      gradient), with the padding recomputed in the backward pass.
    """

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            return conv2d_backward(x, kernel, dy, stride, pads, matmul)

        return conv2d_forward(x, kernel, stride, pads), grad

    return conv(x, kernel)


def use_matmul_weight_grad(
    kernel_size: int, stride: int, input_shape, dtype=tf.bfloat16
) -> bool:
    """Whether `--conv_backward=auto` takes the matmul kernel gradient.

    Args:
      kernel_size: k of the square kernel.
      stride: the conv's stride.
      input_shape: the unpadded NHWC input shape (H, W may be None).
      dtype: the conv's compute dtype.

    Returns:
      True where it was measured faster: 3x3 with at most
      `AUTO_MAX_OUTPUT_POSITIONS` output positions per image, in 16-bit
      floats or strided, and stride-1 float32 ones with at most
      `AUTO_FLOAT32_MAX_OUTPUT_POSITIONS`.
    """
    height, width = tuple(input_shape)[1:3]
    if height is None or width is None:
        return False
    out_positions = -(-height // stride) * -(-width // stride)
    limit = AUTO_MAX_OUTPUT_POSITIONS
    if tf.as_dtype(dtype).size > 2 and stride == 1:
        limit = AUTO_FLOAT32_MAX_OUTPUT_POSITIONS  # oneDNN's SAME gradient.
    return kernel_size == 3 and out_positions <= limit
