"""Tests of the ResNet encoder against SPEC.md §3 and NumPy references."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models import blocks, layers, resnet
from tests.helpers import two_replica_strategy

EPS = 1e-5  # SPEC.md §3


def count(variables) -> int:
    return sum(math.prod(v.shape) for v in variables)


def expected_encoder_params(depth, m=1, sk=0.0, se=0.0, cifar=False):
    """(trainable, non-trainable) counted by hand from SPEC.md §3."""
    kind, nums = {
        18: ("basic", (2, 2, 2, 2)),
        34: ("basic", (3, 4, 6, 3)),
        50: ("bottleneck", (3, 4, 6, 3)),
        101: ("bottleneck", (3, 4, 23, 3)),
        152: ("bottleneck", (3, 8, 36, 3)),
        200: ("bottleneck", (3, 24, 36, 3)),
    }[depth]
    tr = nt = 0

    def conv(k, cin, cout, bias=False):
        nonlocal tr
        tr += k * k * cin * cout + (cout if bias else 0)

    def bn(c):
        nonlocal tr, nt
        tr += 2 * c  # gamma, beta
        nt += 2 * c  # moving mean, moving variance

    if cifar:
        conv(3, 3, 64 * m)
        bn(64 * m)
    elif sk:
        for cin, cout in ((3, 32 * m), (32 * m, 32 * m), (32 * m, 64 * m)):
            conv(3, cin, cout)
            bn(cout)
    else:
        conv(7, 3, 64 * m)
        bn(64 * m)
    cin = 64 * m
    for g, n in enumerate(nums):
        f = 64 * m * 2**g
        out = f * (4 if kind == "bottleneck" else 1)
        for b in range(n):
            if b == 0:  # projection shortcut (ResNet-D adds no weights)
                conv(1, cin, out)
                bn(out)
            if kind == "basic":
                conv(3, cin, f)
                bn(f)
                conv(3, f, f)
                bn(f)
            else:
                conv(1, cin, f)
                bn(f)
                if sk:
                    mid = max(int(f * sk), 32)
                    conv(3, f, 2 * f)
                    bn(2 * f)
                    conv(1, f, mid)
                    bn(mid)
                    conv(1, mid, 2 * f)
                else:
                    conv(3, f, f)
                    bn(f)
                conv(1, f, out)
                bn(out)
            if se:
                r = max(1, int(f * se))
                conv(1, out, r, bias=True)
                conv(1, r, out, bias=True)
            cin = out
    return tr, nt


def np_conv(x, w, stride=1, pads=(0, 0), bias=None):
    """NHWC cross-correlation with explicit (before, after) zero padding."""
    x = np.pad(x, [(0, 0), pads, pads, (0, 0)])
    k = w.shape[0]
    ho = (x.shape[1] - k) // stride + 1
    wo = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for i in range(k):
        for j in range(k):
            patch = x[
                :,
                i : i + stride * (ho - 1) + 1 : stride,
                j : j + stride * (wo - 1) + 1 : stride,
            ]
            out += patch @ w[i, j]
    return out if bias is None else out + bias


def np_bn_inference(x, bn):
    """BN with moving statistics (what training=False uses)."""
    mean = bn.moving_mean.numpy()
    var = bn.moving_variance.numpy()
    y = (x - mean) / np.sqrt(var + EPS) * bn.gamma.numpy()
    return y + bn.beta.numpy() if bn.center else y


def bn_layers(layer):
    return [
        lr
        for lr in layer._flatten_layers(include_self=False)
        if isinstance(lr, keras.layers.BatchNormalization)
    ]


def randomize(layer, seed=0):
    """Random weights and BN statistics, so nothing is an identity."""
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.5)
    for bn in bn_layers(layer):
        var = np.abs(rng.normal(size=bn.moving_variance.shape)) + 0.5
        bn.moving_variance.assign(var.astype("float32"))


def small_resnet(**kwargs):
    kwargs.setdefault("global_bn", False)
    encoder = resnet.ResNet(18, 1, cifar_stem=True, **kwargs)
    encoder.build((None, 16, 16, 3))
    return encoder


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "depth, sk, cifar",
    [(18, 0.0, False), (18, 0.0625, False), (18, 0.0, True)],
)
def test_encoder_params_match_params_md(depth, sk, cifar):
    # PARAMS.md "encoder trainable / non-trainable" columns.
    table = {
        (18, 0.0, False): (11_180_736, 9_728),
        (18, 0.0625, False): (11_199_968, 9_856),
        (18, 0.0, True): (11_173_056, 9_728),
        (50, 0.0, False): (23_508_032, 53_120),
        (50, 0.0625, False): (35_215_584, 61_824),
        (101, 0.0, False): (42_500_160, 105_344),
        (50, 0.0, True): (23_500_352, 53_120),
    }
    encoder = resnet.ResNet(depth, 1, cifar, sk)
    encoder.build((None, None, None, 3))
    got = (
        count(encoder.trainable_weights),
        count(encoder.non_trainable_weights),
    )
    assert got == table[(depth, sk, cifar)]
    assert got == expected_encoder_params(depth, 1, sk, 0.0, cifar)


@pytest.mark.parametrize(
    "depth, m, sk, se, cifar",
    [
        (34, 1, 0.0, 0.0, False),
        (18, 2, 0.0625, 0.25, True),
        pytest.param(50, 1, 0.0625, 0.0625, False, marks=pytest.mark.slow),
        pytest.param(200, 1, 0.0, 0.0, True, marks=pytest.mark.slow),
    ],
)
def test_encoder_params_closed_form(depth, m, sk, se, cifar):
    encoder = resnet.ResNet(depth, m, cifar, sk, se)
    encoder.build((None, None, None, 3))
    got = (
        count(encoder.trainable_weights),
        count(encoder.non_trainable_weights),
    )
    assert got == expected_encoder_params(depth, m, sk, se, cifar)
    assert encoder.output_dim == (512 if depth < 50 else 2048) * m


def test_closed_form_matches_simclrv2_paper():
    # SimCLRv2 (arXiv:2006.10029) Table 1, encoder sizes in millions.
    for depth, m, sk, millions in [
        (50, 1, 0.0, 24),
        (50, 1, 0.0625, 35),
        (50, 2, 0.0625, 140),
        (101, 1, 0.0625, 65),
        (152, 1, 0.0625, 89),
        (152, 3, 0.0625, 795),
    ]:
        tr, nt = expected_encoder_params(depth, m, sk)
        assert round((tr + nt) / 1e6) == millions


@pytest.mark.slow
def test_resnet152_3x_sk_builds():
    # The largest SimCLRv2 model: build only (no forward pass at 224).
    encoder = resnet.ResNet(152, 3, False, 0.0625)
    encoder.build((None, 224, 224, 3))
    got = (
        count(encoder.trainable_weights),
        count(encoder.non_trainable_weights),
    )
    assert got == expected_encoder_params(152, 3, 0.0625)
    assert encoder.output_dim == 6144


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "depth, m, size, cifar",
    [(18, 1, 32, True), (18, 2, 32, True), (18, 1, 224, False)],
)
def test_endpoint_shapes(depth, m, size, cifar):
    encoder = resnet.ResNet(depth, m, cifar, global_bn=False)
    out = encoder(tf.zeros((1, size, size, 3)), training=False)
    s = size if cifar else size // 4  # CIFAR stem: no stride, no pool
    w = 64 * m * (4 if depth >= 50 else 1)
    assert set(out) == set(resnet.ENDPOINTS)
    conv_side = size if cifar else size // 2
    assert tuple(out["initial_conv"].shape) == (1, conv_side, conv_side, 64 * m)
    assert tuple(out["initial_max_pool"].shape) == (1, s, s, 64 * m)
    for g in range(4):
        side = s // 2**g
        assert tuple(out[f"block_group{g + 1}"].shape) == (1, side, side, w)
        w *= 2
    assert tuple(out["final_avg_pool"].shape) == (1, encoder.output_dim)
    assert out["final_avg_pool"].dtype == tf.float32


@pytest.mark.slow
@pytest.mark.parametrize("sk", [0.0, 0.0625])
def test_resnet50_224_shapes(sk):
    encoder = resnet.ResNet(50, 1, False, sk, global_bn=False)
    out = encoder(tf.zeros((1, 224, 224, 3)), training=False)
    assert tuple(out["initial_max_pool"].shape) == (1, 56, 56, 64)
    assert tuple(out["block_group1"].shape) == (1, 56, 56, 256)
    assert tuple(out["block_group4"].shape) == (1, 7, 7, 2048)
    assert tuple(out["final_avg_pool"].shape) == (1, 2048)


# ---------------------------------------------------------------- math


@pytest.mark.parametrize("k, size", [(3, 6), (3, 7), (7, 9), (1, 5)])
def test_fixed_padding_conv(k, size):
    layer = layers.Conv2DFixedPadding(4, k, 2)
    x = np.random.default_rng(1).normal(size=(2, size, size, 3))
    y = layer(x.astype("float32")).numpy()
    pad = k - 1  # SPEC.md §3: total k - 1, begin (k - 1) // 2
    ref = np_conv(x, layer.kernel.numpy(), 2, (pad // 2, pad - pad // 2))
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=1e-4)
    assert layer.bias is None
    assert layer.compute_output_shape((2, size, size, 3)) == ref.shape


def test_stride1_conv_is_same():
    layer = layers.Conv2DFixedPadding(4, 3, 1)
    x = np.random.default_rng(2).normal(size=(1, 5, 5, 2))
    y = layer(x.astype("float32"))
    ref = np_conv(x, layer.kernel.numpy(), 1, (1, 1))
    np.testing.assert_allclose(y, ref, atol=1e-4)


def test_conv_initializer_is_truncated_fan_in():
    layer = layers.Conv2DFixedPadding(256, 3, 1)
    layer.build((None, None, None, 128))
    w = layer.kernel.numpy()
    std = math.sqrt(1.0 / (3 * 3 * 128))  # VarianceScaling(1, fan_in)
    assert abs(w.std() / std - 1) < 0.02
    assert np.abs(w).max() <= 2 * std / 0.87962566 + 1e-6
    assert abs(w.mean()) < 0.01 * std * 10


def test_sk_conv_matches_numpy():
    layer = layers.SelectiveKernelConv(4, 2, 0.0625, global_bn=False)
    layer.build((None, None, None, 3))
    randomize(layer, 3)
    x = np.random.default_rng(4).normal(size=(2, 6, 6, 3))
    y = layer(x.astype("float32"), training=False).numpy()
    h = np_conv(x, layer.conv.kernel.numpy(), 2, (1, 1))
    h = np.maximum(np_bn_inference(h, layer.bn), 0)
    a, b = h[..., :4], h[..., 4:]
    g = (a + b).mean(axis=(1, 2), keepdims=True)
    assert layer.mix_conv0.filters == 32  # max(4 * 0.0625, 32)
    g = np_conv(g, layer.mix_conv0.kernel.numpy())
    g = np.maximum(np_bn_inference(g, layer.mix_bn), 0)
    mix = np_conv(g, layer.mix_conv1.kernel.numpy())
    logits = np.stack([mix[..., :4], mix[..., 4:]])  # (2, N, 1, 1, 4)
    w = np.exp(logits) / np.exp(logits).sum(axis=0)
    ref = w[0] * a + w[1] * b
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_squeeze_excitation_matches_numpy():
    layer = layers.SqueezeExcitation(6, 2)
    layer.build((None, None, None, 6))
    randomize(layer, 5)
    x = np.random.default_rng(6).normal(size=(2, 3, 3, 6))
    y = layer(x.astype("float32")).numpy()
    s = x.mean(axis=(1, 2), keepdims=True)
    s = np.maximum(
        np_conv(s, layer.reduce.kernel.numpy(), bias=layer.reduce.bias), 0
    )
    s = np_conv(s, layer.expand.kernel.numpy(), bias=layer.expand.bias)
    np.testing.assert_allclose(y, x / (1 + np.exp(-s)), rtol=1e-4, atol=1e-5)


def test_basic_block_matches_numpy():
    block = blocks.BasicBlock(
        4, 2, use_projection=True, global_bn=False, name="b"
    )
    block.build((None, None, None, 3))
    randomize(block, 7)
    x = np.random.default_rng(8).normal(size=(2, 6, 6, 3))
    y = block(x.astype("float32"), training=False).numpy()
    h = np_conv(x, block.conv1.kernel.numpy(), 2, (1, 1))
    h = np.maximum(np_bn_inference(h, block.bn1), 0)
    h = np_bn_inference(
        np_conv(h, block.conv2.kernel.numpy(), 1, (1, 1)), block.bn2
    )
    sc = np_conv(x, block.shortcut_conv.kernel.numpy(), 2)
    sc = np_bn_inference(sc, block.shortcut_bn)
    np.testing.assert_allclose(y, np.maximum(h + sc, 0), rtol=1e-4, atol=1e-4)


def test_bottleneck_resnet_d_shortcut_matches_numpy():
    # sk_ratio > 0: 2x2 average pool (pad 0 before / 1 after), 1x1 conv.
    block = blocks.BottleneckBlock(
        2, 2, use_projection=True, sk_ratio=0.0625, global_bn=False
    )
    block.build((None, None, None, 3))
    randomize(block, 9)
    x = np.random.default_rng(10).normal(size=(1, 5, 5, 3))
    sc = block._shortcut(tf.constant(x, tf.float32), training=False).numpy()
    xp = np.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
    pooled = (
        xp[:, 0:5:2, 0:5:2]
        + xp[:, 1:6:2, 0:5:2]
        + xp[:, 0:5:2, 1:6:2]
        + xp[:, 1:6:2, 1:6:2]
    ) / 4
    ref = np_bn_inference(
        np_conv(pooled, block.shortcut_conv.kernel.numpy()), block.shortcut_bn
    )
    np.testing.assert_allclose(sc, ref, rtol=1e-4, atol=1e-5)
    assert block(x.astype("float32")).shape == (1, 3, 3, 8)


# ---------------------------------------------------------------- BN, init


@pytest.mark.parametrize(
    "depth, global_bn, last_bn", [(50, True, "bn3"), (18, False, "bn2")]
)
def test_batch_norm_settings(depth, global_bn, last_bn):
    encoder = resnet.ResNet(
        depth, 1, True, 0.0625, 0.25, batch_norm_decay=0.97, global_bn=global_bn
    )
    encoder.build((None, None, None, 3))
    bns = bn_layers(encoder)
    assert count(v for b in bns for v in b.non_trainable_weights) == (
        count(encoder.non_trainable_weights)
    )
    for b in bns:
        assert b.epsilon == EPS
        assert b.momentum == 0.97
        assert b.synchronized == global_bn
    # The last BN of every block starts with gamma = 0, the others at 1.
    last = {
        id(getattr(blk, last_bn))
        for g in encoder.block_groups
        for blk in g.blocks
    }
    assert len(last) == (16 if depth == 50 else 8)
    for b in bns:
        expected = 0.0 if id(b) in last else 1.0
        np.testing.assert_array_equal(b.gamma.numpy(), expected)


def test_blocks_start_as_identity_of_shortcut():
    # gamma = 0 in the last BN: a fresh block outputs relu(shortcut(x)).
    block = blocks.BasicBlock(3, 1, global_bn=False)
    x = np.random.default_rng(11).normal(size=(2, 4, 4, 3)).astype("float32")
    np.testing.assert_allclose(
        block(x, training=True), np.maximum(x, 0), atol=1e-6
    )


# ---------------------------------------------------------------- freezing


@pytest.mark.parametrize("k", [0, 2, 4])
def test_freezing(k):
    encoder = small_resnet(fine_tune_after_block=k)
    frozen = [v for p in encoder.parts[: k + 1] for v in p.weights]
    free = [v for p in encoder.parts[k + 1 :] for v in p.weights]
    trainable_ids = {id(v) for v in encoder.trainable_variables}
    assert not trainable_ids & {id(v) for v in frozen}
    assert trainable_ids == {id(v) for v in free if v.trainable}
    before = [v.numpy() for v in encoder.weights]
    x = tf.random.uniform((4, 16, 16, 3), seed=1)
    frozen_values = [v.value for v in frozen]
    with tf.GradientTape() as tape:
        tape.watch(frozen_values)
        out = encoder(x, training=True)
        loss = tf.reduce_sum(out["final_avg_pool"] ** 2)
    grads = tape.gradient(loss, frozen_values + encoder.trainable_variables)
    assert all(g is None for g in grads[: len(frozen)])
    if k < 4:
        assert all(g is not None for g in grads[len(frozen) :])
    # A training-mode call leaves every frozen weight and BN statistic
    # bit-identical; unfrozen BN statistics do move.
    frozen_ids = {id(v) for v in frozen}
    free_means = {
        id(b.moving_mean) for p in encoder.parts[k + 1 :] for b in bn_layers(p)
    }
    for v, old in zip(encoder.weights, before, strict=True):
        changed = not np.array_equal(v.numpy(), old)
        if id(v) in frozen_ids:
            assert not changed, v.path
        elif id(v) in free_means:
            assert changed, v.path


def test_no_freezing_by_default():
    encoder = small_resnet()
    assert len(encoder.trainable_variables) == len(encoder.trainable_weights)
    assert (
        count(encoder.trainable_variables)
        == expected_encoder_params(18, cifar=True)[0]
    )


def test_invalid_arguments():
    with pytest.raises(ValueError, match="depth=20"):
        resnet.ResNet(20)
    with pytest.raises(ValueError, match="fine_tune_after_block=5"):
        resnet.ResNet(18, fine_tune_after_block=5)


# ---------------------------------------------------------------- saving


def test_get_config_round_trip():
    encoder = resnet.ResNet(
        50, 2, True, 0.0625, 0.25, 0.95, False, fine_tune_after_block=1
    )
    config = encoder.get_config()
    clone = resnet.ResNet.from_config(config)
    assert clone.get_config() == config
    assert [p.trainable for p in clone.parts] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_checkpoint_tracks_every_variable(tmp_path):
    # Lists of layers are invisible to tf.train.Checkpoint in Keras 3.
    encoder = small_resnet(sk_ratio=0.0625, se_ratio=0.25)
    path = tf.train.Checkpoint(e=encoder).save(str(tmp_path / "ckpt"))
    saved = [n for n, _ in tf.train.list_variables(path) if n.startswith("e/")]
    assert len(saved) == len(encoder.weights)
    clone = small_resnet(sk_ratio=0.0625, se_ratio=0.25)
    tf.train.Checkpoint(e=clone).restore(path).assert_consumed()
    for a, b in zip(encoder.weights, clone.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize(
    "layer",
    [
        layers.Conv2DFixedPadding(8, 7, 2),
        layers.SelectiveKernelConv(8, 2, 0.0625, 0.95, False),
        layers.SqueezeExcitation(8, 2),
        blocks.BasicBlock(8, 2, use_projection=True, sk_ratio=0.0625),
        blocks.BottleneckBlock(8, 1, use_projection=True, se_ratio=0.25),
        blocks.BlockGroup(8, "bottleneck", 2, 2, 0.0625, 0.0, 0.9, False),
        resnet.Stem(2, False, 0.0625, 0.95, False),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_layer_config_round_trip(layer):
    x = np.random.default_rng(12).normal(size=(2, 8, 8, 8))
    x = x.astype("float32")
    layer.build(x.shape)
    randomize(layer, 13)
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    a, b = layer(x, training=False), clone(x, training=False)
    for key in a if isinstance(a, dict) else [None]:
        u, v = (a, b) if key is None else (a[key], b[key])
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_matches_the_batch_norm_formula(policy):
    # layers.BatchNorm's fused training path (the performance change the
    # benchmark measures) against BN written out: batch mean, biased
    # variance, eps 1e-5, moving averages with momentum 0.9.
    keras.mixed_precision.set_global_policy(policy)
    try:
        x = tf.random.stateless_normal((8, 5, 5, 6), [1, 2]) * 3.0 + 1.0
        r = tf.random.stateless_normal((8, 5, 5, 6), [3, 4])
        gamma = tf.random.stateless_normal((6,), [5, 6])
        beta = 0.5 * gamma
        layer = layers.batch_norm(0.9, global_bn=True)
        layer.build(x.shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        assert layer._fused_training(x, True, None)

        def reference(x, gamma, beta):
            mean = tf.reduce_mean(x, axis=[0, 1, 2])
            var = tf.reduce_mean(tf.square(x - mean), axis=[0, 1, 2])
            return (x - mean) / tf.sqrt(var + 1e-5) * gamma + beta, mean, var

        xq = tf.cast(tf.cast(x, layer.compute_dtype), tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(xq)
            y = tf.cast(layer(xq, training=True), tf.float32)
            loss = tf.reduce_sum(y * r)
        grads = tape.gradient(loss, [xq, layer.gamma, layer.beta])
        with tf.GradientTape() as tape:
            tape.watch([xq, gamma, beta])
            y_ref, mean, var = reference(xq, gamma, beta)
            loss_ref = tf.reduce_sum(y_ref * r)
        grads_ref = tape.gradient(loss_ref, [xq, gamma, beta])
        tol = 1e-4 if policy == "float32" else 2e-2  # bf16: 8-bit mantissa.
        np.testing.assert_allclose(y, y_ref, atol=tol * 10, rtol=tol)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            scale = float(tf.reduce_max(tf.abs(g_ref)))
            np.testing.assert_allclose(g, g_ref, atol=tol * scale * 10)
        np.testing.assert_allclose(layer.moving_mean, 0.1 * mean, rtol=1e-4)
        np.testing.assert_allclose(
            layer.moving_variance, 0.9 + 0.1 * var, rtol=1e-4
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_synchronized_batch_norm_over_two_replicas_is_not_fused():
    # Cross-replica statistics need Keras's own path: the fused op only
    # sees the local batch.
    strategy = two_replica_strategy()
    x = tf.zeros((2, 3, 3, 4))
    with strategy.scope():
        synced = layers.batch_norm(0.9, global_bn=True)
        local = layers.batch_norm(0.9, global_bn=False)

    def decisions():
        return tf.constant(
            [synced._fused_training(x, True, None)]
            + [local._fused_training(x, True, None)]
        )

    per_replica = strategy.run(decisions)
    for value in strategy.experimental_local_results(per_replica):
        assert value.numpy().tolist() == [False, True]


def test_set_fused_training_switches_every_batch_norm_of_a_model():
    # The benchmark's fused_bn=off: Keras's own batch norm, the same
    # function (batch statistics in training) without the fused op.
    model = resnet.ResNet(depth=18, cifar_stem=True, base_width=8)
    x = tf.random.stateless_uniform((4, 8, 8, 3), [7, 8])
    model(x, training=False)
    count = len(
        [
            layer
            for layer in model._flatten_layers()
            if isinstance(layer, layers.BatchNorm)
        ]
    )
    assert count == 21  # Stem 1, 8 blocks x 2, 4 projection shortcuts.

    def traced_ops():
        fn = tf.function(lambda x: model(x, training=True)["final_avg_pool"])
        graph = fn.get_concrete_function(x).graph
        return {op.type for op in graph.get_operations()}

    weights = [w.numpy() for w in model.weights]
    fused = model(x, training=True)["final_avg_pool"]
    assert "FusedBatchNormV3" in traced_ops()
    assert layers.set_fused_training(model, False) == count
    assert "FusedBatchNormV3" not in traced_ops()
    for w, value in zip(model.weights, weights, strict=True):
        w.assign(value)  # Undo the moving-statistics updates.
    unfused = model(x, training=True)["final_avg_pool"]
    np.testing.assert_allclose(unfused, fused, rtol=1e-4, atol=1e-5)
    assert layers.set_fused_training(model, True) == count
    assert "FusedBatchNormV3" in traced_ops()


@pytest.mark.parametrize(
    "shape", [(6, 3, 3, 4), (6, 4)], ids=["fused_nhwc", "keras_2d"]
)
def test_unsynchronized_bn_saves_the_mean_over_replicas(shape, tmp_path):
    # global_bn=False on 2 replicas with different data: each replica
    # normalises with its own batch statistics, and what is kept (every
    # replica's copy, hence the checkpoint) is the mean over replicas of
    # the per-replica moving statistics — the reference's ON_READ / MEAN.
    strategy = two_replica_strategy()
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, *shape)).astype(np.float32)
    data[1] = data[1] * 3.0 + 2.0  # Replica 1 sees other statistics.
    with strategy.scope():
        layer = layers.batch_norm(0.9, global_bn=False)
        layer.build(shape)
    momentum, steps = 0.9, 2

    @tf.function
    def train_step():
        def replica():
            context = tf.distribute.get_replica_context()
            x = tf.gather(tf.constant(data), context.replica_id_in_sync_group)
            return layer(x, training=True)

        return strategy.run(replica)

    for _ in range(steps):
        outputs = strategy.experimental_local_results(train_step())

    axes = tuple(range(len(shape) - 1))
    means = data.mean(axis=tuple(a + 1 for a in axes))  # (replicas, C)
    variances = data.var(axis=tuple(a + 1 for a in axes))
    # Per replica: EMA of its own statistics from (0, 1) over `steps`.
    kept = momentum**steps
    replica_mean = (1.0 - kept) * means
    replica_var = kept + (1.0 - kept) * variances
    for r, y in enumerate(outputs):
        expected = (data[r] - means[r]) / np.sqrt(variances[r] + 1e-5)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    for copy in layer.moving_mean.value.values:
        np.testing.assert_allclose(copy, replica_mean.mean(0), rtol=1e-5)
    for copy in layer.moving_variance.value.values:
        np.testing.assert_allclose(copy, replica_var.mean(0), rtol=1e-5)
    path = tf.train.Checkpoint(layer=layer).write(str(tmp_path / "ckpt"))
    reader = tf.train.load_checkpoint(path)
    saved = {
        name: reader.get_tensor(name)
        for name, _ in tf.train.list_variables(path)
        if "moving_" in name
    }
    assert len(saved) == 2
    for name, value in saved.items():
        expected = replica_mean if "moving_mean" in name else replica_var
        np.testing.assert_allclose(value, expected.mean(0), rtol=1e-5)
