"""Tests of simclr_tf.health: collapse monitors against NumPy."""

import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import health


def _numpy_rankme(x, eps=1e-7):
    """Written from the RankMe paper's definition (eq. 1)."""
    s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


@pytest.mark.parametrize("d", [16, 128])
def test_projection_std_of_isotropic_gaussians_is_one_over_sqrt_d(d):
    x = np.random.default_rng(0).normal(size=(8192, d)).astype(np.float32)
    got = float(health.projection_std(x))
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(got, z.std(axis=0).mean(), rtol=1e-4)
    assert got == pytest.approx(1.0 / math.sqrt(d), rel=0.02)


def test_projection_std_of_collapsed_projections_is_zero():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=(1, 64))
    # Every image on one direction, at different lengths, tiny noise.
    x = rng.uniform(0.5, 2.0, size=(512, 1)) * direction
    x += 1e-4 * rng.normal(size=x.shape)
    got = float(health.projection_std(x.astype(np.float32)))
    assert got < 1e-3 * (1.0 / math.sqrt(64))


@pytest.mark.parametrize("k", [1, 3, 17, 64])
def test_rankme_of_a_rank_k_matrix_is_k(k):
    # k equal singular values: the normalised spectrum is uniform over k.
    rng = np.random.default_rng(k)
    u, _ = np.linalg.qr(rng.normal(size=(256, k)))
    v, _ = np.linalg.qr(rng.normal(size=(128, k)))
    x = (u @ v.T).astype(np.float32)  # (256, 128), rank k.
    assert float(health.rankme(x)) == pytest.approx(k, rel=1e-3)


def test_rankme_matches_numpy_on_a_decaying_spectrum():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 64)) * np.geomspace(1.0, 1e-3, 64)
    x = x.astype(np.float32)
    got = float(health.rankme(x))
    np.testing.assert_allclose(got, _numpy_rankme(x), rtol=1e-4)
    assert 1.0 < got < 64.0


def test_monitors_run_in_a_tf_function_on_bfloat16():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 32)).astype(np.float32)

    @tf.function
    def monitors(x):
        return health.projection_std(x), health.rankme(x)

    std, rank = monitors(tf.cast(x, tf.bfloat16))
    assert std.dtype == rank.dtype == tf.float32
    xq = tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy()
    np.testing.assert_allclose(rank, _numpy_rankme(xq), rtol=1e-4)


def test_thresholds():
    std_min, rank_min = health.collapse_thresholds(128, 512, 2048)
    assert std_min == pytest.approx(0.1 / math.sqrt(128))
    assert rank_min == pytest.approx(1.0 + 0.01 * 511)


def test_collapse_detector_warns_once_after_patience(caplog):
    detector = health.CollapseDetector(128, 256, 512, patience=3)
    healthy = (1.0 / math.sqrt(128), 100.0)
    low_std = (0.001, 100.0)
    low_rank = (1.0 / math.sqrt(128), 1.2)
    sequence = [healthy, low_std, low_std, healthy]  # Recovers: no warning.
    sequence += [low_std, low_rank, low_std, low_std, low_std]  # Warns once.
    sequence += [healthy, low_rank, low_rank, low_rank]  # Again.
    with caplog.at_level("WARNING", logger="absl"):
        warned = [
            detector.update(step, std, rank)
            for step, (std, rank) in enumerate(sequence)
        ]
    assert [i for i, w in enumerate(warned) if w] == [6, 12]
    assert caplog.text.count("looks collapsed") == 2
    for cause in ("--learning_rate", "--temperature", "--train_batch_size"):
        assert cause in caplog.text


def test_collapse_detector_skips_missing_values():
    detector = health.CollapseDetector(128, 256, 512, patience=1)
    assert not detector.update(1, None, None)
    assert not detector.update(2, None, 50.0)
    assert detector.update(3, 0.0, None)


def test_rankme_of_all_zero_features_is_one_not_nan():
    assert float(health.rankme(np.zeros((8, 4), np.float32))) == (
        pytest.approx(1.0, abs=1e-4)
    )
