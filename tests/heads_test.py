"""Tests of the projection and supervised heads (SPEC.md §4)."""

import math

import numpy as np
import pytest

from simclr_tf.models import heads

EPS = 1e-5


def count(variables) -> int:
    return sum(math.prod(v.shape) for v in variables)


def np_bn_train(x, gamma, beta):
    """BN with the batch's own statistics (biased variance)."""
    mean = x.mean(axis=0)
    var = x.var(axis=0)
    y = (x - mean) / np.sqrt(var + EPS) * gamma
    return y if beta is None else y + beta


def randomize(layer, seed):
    rng = np.random.default_rng(seed)
    for v in layer.trainable_weights:
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.3)


def features(n=6, d=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype("float32")


@pytest.mark.parametrize(
    "use_bias, use_bn, dense_bias, bn_center",
    [
        (True, False, True, None),
        (False, False, False, None),
        (True, True, False, True),
        (False, True, False, False),
    ],
)
def test_linear_layer_bias_rules(use_bias, use_bn, dense_bias, bn_center):
    layer = heads.LinearLayer(5, use_bias, use_bn, global_bn=False)
    layer.build((None, 8))
    assert (layer.dense.bias is not None) == dense_bias
    if bn_center is None:
        assert layer.bn is None
    else:
        assert layer.bn.center == bn_center
        assert layer.bn.epsilon == EPS


def test_linear_layer_none_units_keeps_width():
    layer = heads.LinearLayer(None, global_bn=False)
    assert tuple(layer(features()).shape) == (6, 8)


def test_dense_init_stddev():
    layer = heads.LinearLayer(512, global_bn=False)
    layer.build((None, 512))
    w = layer.dense.kernel.numpy()
    assert abs(w.std() - 0.01) < 0.0005  # RandomNormal(stddev=0.01)
    np.testing.assert_array_equal(layer.dense.bias.numpy(), 0.0)


def test_nonlinear_head_matches_numpy():
    head = heads.ProjectionHead("nonlinear", 4, 3, global_bn=False)
    x = features()
    head.build(x.shape)
    randomize(head, 1)
    hiddens = head(x, training=True)
    assert len(hiddens) == 4
    np.testing.assert_array_equal(hiddens[0], x)
    h = x.astype("float64")
    refs = [h]
    for j, layer in enumerate(head.linear_layers):
        assert layer.dense.bias is None  # BN after every dense
        h = h @ layer.dense.kernel.numpy()
        beta = layer.bn.beta.numpy() if layer.bn.center else None
        h = np_bn_train(h, layer.bn.gamma.numpy(), beta)
        if j < 2:
            h = np.maximum(h, 0)  # ReLU on the middle layers only
        refs.append(h)
    for got, ref in zip(hiddens, refs, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert [tuple(h.shape) for h in hiddens] == [(6, 8), (6, 8), (6, 8), (6, 4)]
    # The last layer has neither bias nor BN offset; the middle ones do.
    assert [layer.bn.center for layer in head.linear_layers] == [
        True,
        True,
        False,
    ]
    # The last layer's output can be negative (no ReLU).
    assert float(np.min(hiddens[-1])) < 0


def test_linear_head_returns_a_tensor():
    # The reference returns None here (`return list.append(...)`).
    head = heads.ProjectionHead("linear", 4, global_bn=False)
    hiddens = head(features(), training=False)
    assert len(hiddens) == 2
    assert tuple(hiddens[-1].shape) == (6, 4)
    layer = head.linear_layers[0]
    assert layer.dense.bias is None and not layer.bn.center
    ref = features() @ layer.dense.kernel.numpy() / np.sqrt(1 + EPS)
    np.testing.assert_allclose(hiddens[-1], ref, rtol=1e-4, atol=1e-6)


def test_none_head_is_identity():
    head = heads.ProjectionHead("none", global_bn=False)
    hiddens = head(features(), training=True)
    assert len(hiddens) == 1
    np.testing.assert_array_equal(hiddens[0], features())
    assert head.weights == []


@pytest.mark.parametrize(
    "dim, trainable, non_trainable",
    [(512, 592_000, 2_304), (2048, 8_659_072, 8_448)],
)
def test_projection_head_params_match_params_md(dim, trainable, non_trainable):
    head = heads.ProjectionHead("nonlinear", 128, 3)
    head.build((None, dim))
    assert count(head.trainable_weights) == trainable
    assert count(head.non_trainable_weights) == non_trainable
    assert head.hidden_dims(dim) == [dim, dim, dim, 128]


def test_supervised_head():
    head = heads.SupervisedHead(10)
    x = features()
    logits = head(x).numpy()
    kernel = head.dense.kernel.numpy()
    np.testing.assert_allclose(logits, x @ kernel, rtol=1e-5, atol=1e-6)
    assert head.kernels == [head.dense.kernel]
    assert count(head.trainable_weights) == 8 * 10 + 10
    zero = heads.SupervisedHead(10, zero_init=True)
    np.testing.assert_array_equal(zero(x), 0.0)
    np.testing.assert_array_equal(zero.dense.kernel.numpy(), 0.0)


def test_invalid_head_arguments():
    with pytest.raises(ValueError, match="mode='mlp'"):
        heads.ProjectionHead("mlp")
    with pytest.raises(ValueError, match="num_layers=0"):
        heads.ProjectionHead("nonlinear", num_layers=0)


@pytest.mark.parametrize(
    "layer",
    [
        heads.LinearLayer(None, False, True, 0.95, False),
        heads.ProjectionHead("nonlinear", 16, 2, 0.95, False),
        heads.ProjectionHead("linear", 16),
        heads.SupervisedHead(7, zero_init=True),
    ],
    ids=["linear_layer", "nonlinear", "linear", "supervised"],
)
def test_get_config_round_trip(layer):
    x = features()
    layer.build(x.shape)
    randomize(layer, 2)
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    a, b = layer(x, training=False), clone(x, training=False)
    if not isinstance(a, list):
        a, b = [a], [b]
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
