"""The matmul kernel gradient against a float64 NumPy convolution."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models import conv_grad, layers

# (input size, k, stride, (pad before, pad after)): the ResNet's convs.
CASES = [
    (6, 3, 1, (1, 1)),  # 3x3 stride 1 (SAME).
    (7, 3, 2, (1, 1)),  # 3x3 stride 2, odd input.
    (8, 3, 2, (1, 1)),  # 3x3 stride 2, even input.
    (8, 1, 2, (0, 0)),  # 1x1 projection shortcut.
    (9, 7, 2, (3, 3)),  # ImageNet stem.
    (5, 1, 1, (0, 0)),
    (6, 2, 1, (0, 1)),  # Even kernels pad less before than after.
    (5, 4, 2, (1, 2)),
]


def _numpy_conv(x, w, dy, stride, pads):
    """(y, dx, dw) of a padded VALID conv, by loops over taps, float64."""
    k, b, a = w.shape[0], pads[0], pads[1]
    xp = np.pad(x, [(0, 0), (b, a), (b, a), (0, 0)])
    n, hp, wp, _ = xp.shape
    oh, ow = (hp - k) // stride + 1, (wp - k) // stride + 1
    y = np.zeros((n, oh, ow, w.shape[-1]))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(k):
        for j in range(k):
            win = xp[
                :, i : i + stride * oh : stride, j : j + stride * ow : stride
            ]
            y += win @ w[i, j]
            if dy is not None:
                dw[i, j] = np.einsum("nhwc,nhwo->co", win, dy)
                dxp[
                    :,
                    i : i + stride * oh : stride,
                    j : j + stride * ow : stride,
                ] += dy @ w[i, j].T
    dx = dxp[:, b : hp - a, b : wp - a]
    return y, dx, dw


def _inputs(size, k, c_in, c_out, dtype, stride, pads):
    rng = np.random.default_rng(size * 10 + k)
    x = rng.normal(size=(2, size, size, c_in))
    w = rng.normal(size=(k, k, c_in, c_out)) / k
    # Round to the compute dtype so that the reference sees the same inputs.
    x = tf.cast(tf.cast(x, dtype), tf.float64).numpy()
    w = tf.cast(tf.cast(w, dtype), tf.float64).numpy()
    oh = (size + sum(pads) - k) // stride + 1
    dy = rng.normal(size=(2, oh, oh, c_out))
    dy = tf.cast(tf.cast(dy, dtype), tf.float64).numpy()
    return x, w, dy


def _tolerance(dtype):
    # Result rounding of the dtype (float32 accumulation inside), relative
    # to the sum of |terms| of each output element.
    return 2.0**-7 if dtype == tf.bfloat16 else 1e-5


def _grads(fn, x, w, dy, dtype):
    xt, wt = tf.constant(x, dtype), tf.constant(w, dtype)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        y = fn(xt, wt)
    dx, dw = tape.gradient(y, [xt, wt], output_gradients=tf.constant(dy, dtype))
    return [tf.cast(t, tf.float64).numpy() for t in (y, dx, dw)]


@pytest.mark.parametrize("matmul", [True, False])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("size,k,stride,pads", CASES)
def test_conv2d_and_its_gradients_match_numpy(
    size, k, stride, pads, dtype, matmul
):
    x, w, dy = _inputs(size, k, 3, 5, dtype, stride, pads)
    ref = _numpy_conv(x, w, dy, stride, pads)
    bound = _numpy_conv(np.abs(x), np.abs(w), np.abs(dy), stride, pads)
    got = _grads(
        lambda a, b: conv_grad.conv2d(a, b, stride, pads, matmul),
        x,
        w,
        dy,
        dtype,
    )
    # TF's own gradient of the same conv: held to the same bound.
    padded = [[0, 0], list(pads), list(pads), [0, 0]]
    tf_own = _grads(
        lambda a, b: tf.nn.conv2d(tf.pad(a, padded), b, stride, "VALID"),
        x,
        w,
        dy,
        dtype,
    )
    names = ("y", "dx", "dw")
    for name, r, g, t, m in zip(names, ref, got, tf_own, bound, strict=True):
        assert g.shape == r.shape, name
        tol = _tolerance(dtype) * m + 1e-12
        assert np.all(np.abs(g - r) <= tol), name
        assert np.all(np.abs(t - r) <= tol), name


@pytest.mark.parametrize("stride", [1, 2])
def test_layer_gradients_agree_across_backwards(stride):
    x = tf.random.stateless_normal((4, 8, 8, 8), seed=(1, 2))
    grads = {}
    for mode in ("tf", "auto", "matmul"):
        layer = layers.Conv2DFixedPadding(6, 3, stride, backward=mode)
        layer.build(x.shape)
        layer.kernel.assign(
            tf.random.stateless_normal(layer.kernel.shape, seed=(3, 4))
        )
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.sin(y))
        grads[mode] = [y, *tape.gradient(loss, [x, layer.kernel])]
    for mode in ("auto", "matmul"):
        for a, b in zip(grads["tf"], grads[mode], strict=True):
            np.testing.assert_allclose(
                a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4
            )


def test_auto_picks_matmul_only_for_small_3x3_maps():
    pick = conv_grad.use_matmul_weight_grad
    assert pick(3, 1, (None, 4, 4, 512))
    assert pick(3, 1, (None, 8, 8, 256))
    # The unpadded input shape: stride 2 halves it (rounding up).
    assert pick(3, 2, (None, 8, 8, 256))  # To 4x4.
    assert pick(3, 2, (None, 16, 16, 128))  # To 8x8.
    assert not pick(3, 2, (None, 17, 17, 128))  # To 9x9.
    assert not pick(3, 1, (None, 16, 16, 128))
    assert not pick(3, 2, (None, 32, 32, 64))
    assert not pick(1, 1, (None, 4, 4, 512))
    assert not pick(3, 1, (None, None, None, 512))
    # float32: oneDNN's SAME gradient wins at stride 1 above 4x4, matmuls
    # strided.
    assert pick(3, 1, (None, 4, 4, 512), tf.float32)
    assert not pick(3, 1, (None, 8, 8, 256), tf.float32)
    assert pick(3, 2, (None, 8, 8, 256), tf.float32)
    assert pick(3, 2, (None, 16, 16, 128), tf.float32)
    assert pick(3, 1, (None, 4, 4, 512), tf.float16)


def test_unknown_backward_is_rejected():
    with pytest.raises(ValueError, match="backward='fast'"):
        layers.Conv2DFixedPadding(4, 3, 1, backward="fast")
