"""BN-ReLU recomputation and the custom conv gradients, against TF's own."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models import blocks, conv_grad, layers, recompute, resnet
from tests.helpers import two_replica_strategy


def _pair(stride, backward, kernel_size=3, bn_channels=5):
    """A BN over `bn_channels` (5: before the conv, 6: after it) and a
    5 -> 6 channel conv."""
    bn = layers.batch_norm(0.9, global_bn=False)
    conv = layers.Conv2DFixedPadding(6, kernel_size, stride, backward=backward)
    bn.build((None, 8, 8, bn_channels))
    conv.build((None, 8, 8, 5))
    bn.gamma.assign(tf.linspace(0.5, 1.5, bn_channels))
    bn.beta.assign(tf.linspace(-0.3, 0.3, bn_channels))
    conv.kernel.assign(
        tf.random.stateless_normal(conv.kernel.shape, seed=(3, 4))
    )
    return bn, conv


def _counted_backward(monkeypatch) -> list:
    """Counts calls of `conv_grad.conv2d_backward` (the custom paths)."""
    calls = []
    backward_fn = conv_grad.conv2d_backward

    def counted(*args):
        calls.append(1)
        return backward_fn(*args)

    monkeypatch.setattr(conv_grad, "conv2d_backward", counted)
    return calls


def _run(z, stride, backward, recomputed, shortcut=False):
    """conv(relu(bn(z))), or with `shortcut` a 1x1 conv's bn(conv(z)), its
    output, gradients and moving statistics."""
    if shortcut:
        bn, conv = _pair(stride, backward, kernel_size=1, bn_channels=6)
    else:
        bn, conv = _pair(stride, backward)
    variables = [bn.gamma, bn.beta, conv.kernel]
    with tf.GradientTape() as tape:
        tape.watch(z)
        if shortcut:
            y = recompute.conv_bn(z, conv, bn, True, recomputed)
        else:
            y = recompute.bn_relu_conv(z, bn, conv, True, recomputed)
        loss = tf.reduce_sum(y * tf.sin(y))
    grads = tape.gradient(loss, [z, *variables])
    return [y, *grads, bn.moving_mean, bn.moving_variance]


@pytest.mark.parametrize("backward", ["auto", "matmul"])
@pytest.mark.parametrize("stride", [1, 2])
def test_bn_relu_conv_matches_the_plain_chain(stride, backward, monkeypatch):
    z = tf.random.stateless_normal((4, 8, 8, 5), seed=(1, 2)) * 2.0 + 0.5
    calls = _counted_backward(monkeypatch)
    got = _run(z, stride, backward, True)
    assert calls, "the recomputing path was not taken"
    # TF's own conv, BN and ReLU gradients.
    want = _run(z, stride, "tf", False)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_bn_matches_tf_own_shortcut(stride, monkeypatch):
    # A projection shortcut, bn(conv_1x1(x)), as Keras computes it with
    # TF's own conv gradient, against the path that recomputes the conv.
    x = tf.random.stateless_normal((4, 8, 8, 5), seed=(1, 2)) + 0.5
    calls = _counted_backward(monkeypatch)
    got = _run(x, stride, "auto", True, shortcut=True)
    assert calls, "the recomputing path was not taken"
    want = _run(x, stride, "tf", False, shortcut=True)
    assert got[0].shape == (4, 8 // stride, 8 // stride, 6)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4
        )


def test_bn_relu_conv_is_the_plain_chain_when_not_fused():
    z = tf.random.stateless_normal((2, 8, 8, 5), seed=(1, 2))
    bn, conv = _pair(1, "auto")
    bn.trainable = False  # Inference-mode BN: the Keras layer's path.
    got = recompute.bn_relu_conv(z, bn, conv, True)
    want = conv(tf.nn.relu(bn(z, training=True)))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_gradients_match_tf_own(depth, monkeypatch):
    # Block 1 applies the CIFAR stem's BN-ReLU itself on the fast path.
    input_bns = []
    branches_fn = blocks.bn_relu_branches

    def spied(z, bn, *args):
        input_bns.append(bn)
        return branches_fn(z, bn, *args)

    monkeypatch.setattr(blocks, "bn_relu_branches", spied)
    kwargs = dict(depth=depth, cifar_stem=True, base_width=8, global_bn=False)
    fast = resnet.ResNet(conv_backward="auto", recompute_bn_relu=True, **kwargs)
    plain = resnet.ResNet(conv_backward="tf", recompute_bn_relu=False, **kwargs)
    images = tf.random.stateless_uniform((4, 32, 32, 3), seed=(5, 6))
    for model in (fast, plain):
        model.build(images.shape)
    plain.set_weights(fast.get_weights())
    # Non-zero last gammas so that every branch has a gradient.
    for model in (fast, plain):
        for v in model.weights:
            if "gamma" in v.path:
                v.assign(tf.ones_like(v) * 0.7)
    results = []
    for model in (fast, plain):
        with tf.GradientTape() as tape:
            endpoints = model(images, training=True)
            out = endpoints["final_avg_pool"]
            loss = tf.reduce_sum(out * tf.cos(out))
        grads = tape.gradient(loss, model.trainable_variables)
        assert all(g is not None for g in grads)
        # Moving statistics: each BN updated once, the stem's included.
        results.append(
            [
                out,
                endpoints["initial_max_pool"],
                *grads,
                *model.non_trainable_variables,
            ]
        )
    assert fast.stem.bns[-1] in input_bns
    for a, b in zip(*results, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        scale = np.abs(b).max() + 1e-6
        np.testing.assert_allclose(a / scale, b / scale, atol=2e-4)


def test_bfloat16_step_matches_tf_own_within_rounding():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        z = tf.cast(
            tf.random.stateless_normal((8, 8, 8, 5), seed=(1, 2)), tf.bfloat16
        )
        got = _run(z, 1, "matmul", True)
        want = _run(z, 1, "tf", False)
    finally:  # The global policy would leak into later tests.
        keras.mixed_precision.set_global_policy("float32")
    for a, b in zip(got, want, strict=True):
        a = tf.cast(a, tf.float32).numpy()
        b = tf.cast(b, tf.float32).numpy()
        scale = np.abs(b).max() + 1e-6
        # A few bfloat16 roundings (2^-8 relative each) apart.
        np.testing.assert_allclose(a / scale, b / scale, atol=2e-2)


def _plain_formula(z, gamma, beta, kernel):
    """conv(relu(bn(z))) from TF's primitive ops (stride 1), its loss."""
    mean, variance = tf.nn.moments(z, [0, 1, 2])
    a = tf.nn.relu(
        tf.nn.batch_normalization(z, mean, variance, beta, gamma, 1e-5)
    )
    y = tf.nn.conv2d(a, kernel, 1, "SAME")
    return y, tf.reduce_sum(y * tf.sin(y))


def test_two_replicas_recompute_and_keep_the_replica_mean_statistics(
    monkeypatch,
):
    # global_bn=False on 2 replicas with different data: the recomputing
    # path normalises each replica by its own batch, and its moving
    # statistics go through BatchNorm's replica averaging (every copy =
    # the mean over replicas of the per-replica update, reference MEAN).
    calls = _counted_backward(monkeypatch)
    strategy = two_replica_strategy()
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 4, 8, 8, 5)).astype(np.float32)
    data[1] = data[1] * 3.0 + 2.0  # Replica 1 sees other statistics.
    with strategy.scope():
        bn, conv = _pair(1, "matmul")

    @tf.function
    def step():
        def replica():
            context = tf.distribute.get_replica_context()
            z = tf.gather(tf.constant(data), context.replica_id_in_sync_group)
            with tf.GradientTape() as tape:
                tape.watch(z)
                y = recompute.bn_relu_conv(z, bn, conv, True)
                loss = tf.reduce_sum(y * tf.sin(y))
            return y, tape.gradient(loss, z)

        return strategy.run(replica)

    ys, dzs = (strategy.experimental_local_results(t) for t in step())
    assert calls, "the recomputing path was not taken"
    weights = [tf.constant(v.numpy()) for v in (bn.gamma, bn.beta)]
    kernel = tf.constant(conv.kernel.numpy())
    for r in range(2):
        z = tf.constant(data[r])
        with tf.GradientTape() as tape:
            tape.watch(z)
            want_y, loss = _plain_formula(z, *weights, kernel)
        want_dz = tape.gradient(loss, z)
        np.testing.assert_allclose(ys[r], want_y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dzs[r], want_dz, rtol=1e-4, atol=1e-4)
    means = data.mean(axis=(1, 2, 3))  # (replicas, C)
    variances = data.var(axis=(1, 2, 3))
    # One update of (0, 1) with momentum 0.9, averaged over replicas.
    for copy in bn.moving_mean.value.values:
        np.testing.assert_allclose(copy, 0.1 * means.mean(0), rtol=1e-5)
    for copy in bn.moving_variance.value.values:
        np.testing.assert_allclose(
            copy, 0.9 + 0.1 * variances.mean(0), rtol=1e-5
        )


def test_synchronized_bn_on_one_replica_recomputes(monkeypatch):
    # global_bn=True over a single replica: the statistics are the local
    # batch's, so the recomputing path applies and equals the formula.
    calls = _counted_backward(monkeypatch)
    bn = layers.batch_norm(0.9, global_bn=True)
    conv = layers.Conv2DFixedPadding(6, 3, 1, backward="auto")
    bn.build((None, 4, 4, 5))
    conv.build((None, 4, 4, 5))
    z = tf.random.stateless_normal((4, 4, 4, 5), seed=(7, 8)) + 1.0
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = recompute.bn_relu_conv(z, bn, conv, True)
        loss = tf.reduce_sum(y * tf.sin(y))
    got = tape.gradient(loss, [z, conv.kernel])
    assert calls, "the recomputing path was not taken"
    gamma, beta = tf.ones([5]), tf.zeros([5])
    kernel = tf.constant(conv.kernel.numpy())
    with tf.GradientTape() as tape:
        tape.watch([z, kernel])
        want_y, loss = _plain_formula(z, gamma, beta, kernel)
    want = tape.gradient(loss, [z, kernel])
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    mean = tf.reduce_mean(z, [0, 1, 2])
    np.testing.assert_allclose(bn.moving_mean, 0.1 * mean, rtol=1e-5)
