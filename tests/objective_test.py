"""The objectives against NumPy: NT-Xent + linear head + weight decay
(pretraining) and cross-entropy + weight decay (fine-tuning)."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import objective
from tests.losses_test import _log_softmax, np_nt_xent

N, DIM, CLASSES, WD, TAU = 4, 6, 3, 0.05, 0.5


def _inputs():
    rng = np.random.default_rng(0)
    proj = rng.normal(size=(2 * N, DIM)).astype("float32")
    logits = rng.normal(size=(2 * N, CLASSES)).astype("float32")
    labels = np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, N)]
    kernel = tf.Variable(rng.normal(size=(DIM, CLASSES)).astype("float32"))
    return proj, logits, labels, kernel


def _np_cross_entropy(labels, logits):
    return float(np.mean(-(labels * _log_softmax(logits)).sum(1)))


def test_contrastive_objective_adds_ntxent_head_and_decay():
    proj, logits, labels, kernel = _inputs()
    obj = objective.ContrastiveObjective(
        temperature=TAU,
        hidden_norm=True,
        num_views=2,
        supervised=True,
        weight_decay=WD,
        decayed_variables=[kernel],
    )
    # The monitors' encoder features are kept too (gradient caching).
    assert obj.output_keys == [
        "proj_head_output",
        "logits_sup",
        "proj_head_input",
    ]
    assert obj.monitor_names == ["proj_std", "rankme"]
    total, metrics = obj(
        {"proj_head_output": proj, "logits_sup": logits},
        labels,
        tf.distribute.get_replica_context(),
    )
    assert list(metrics) == obj.metric_names
    ((contrast, _, _),) = np_nt_xent(proj, TAU, True)
    # The linear head sees both views: labels repeated view-major.
    sup = _np_cross_entropy(np.concatenate([labels, labels]), logits)
    decay = WD * 0.5 * float(np.sum(kernel.numpy().astype(np.float64) ** 2))
    np.testing.assert_allclose(metrics["contrast_loss"], contrast, rtol=1e-5)
    np.testing.assert_allclose(metrics["supervised_loss"], sup, rtol=1e-5)
    np.testing.assert_allclose(metrics["weight_decay"], decay, rtol=1e-5)
    np.testing.assert_allclose(total, contrast + sup + decay, rtol=1e-5)
    assert float(metrics["total_loss"]) == float(total)


def test_contrastive_monitors_against_numpy():
    rng = np.random.default_rng(1)
    proj = rng.normal(size=(2 * N, DIM)).astype("float32")
    # Rank-3 features of width 5: RankMe from NumPy's singular values.
    features = (rng.normal(size=(2 * N, 3)) @ rng.normal(size=(3, 5))).astype(
        "float32"
    )
    obj = objective.ContrastiveObjective(TAU, True, 2, False, 0.0, [])
    got = obj.monitors({"proj_head_output": proj, "proj_head_input": features})
    assert sorted(got) == sorted(obj.monitor_names)
    z = proj / np.linalg.norm(proj, axis=1, keepdims=True)
    np.testing.assert_allclose(got["proj_std"], z.std(0).mean(), rtol=1e-5)
    s = np.linalg.svd(features.astype(np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    np.testing.assert_allclose(
        got["rankme"], np.exp(-(p * np.log(p)).sum()), rtol=1e-4
    )
    assert 1.0 <= float(got["rankme"]) <= 3.0 + 1e-3


def test_supervised_objective_is_cross_entropy_and_decay():
    _, logits, labels, kernel = _inputs()
    obj = objective.SupervisedObjective(WD, [kernel])
    assert obj.output_keys == ["logits_sup"]
    assert obj.monitor_names == [] and obj.monitors({}) == {}
    total, metrics = obj(
        {"logits_sup": logits[:N]}, labels, tf.distribute.get_replica_context()
    )
    assert list(metrics) == obj.metric_names
    sup = _np_cross_entropy(labels, logits[:N])
    decay = WD * 0.5 * float(np.sum(kernel.numpy().astype(np.float64) ** 2))
    np.testing.assert_allclose(total, sup + decay, rtol=1e-5)
    acc = np.mean(labels.argmax(1) == logits[:N].argmax(1))
    assert float(metrics["supervised_acc"]) == pytest.approx(acc)


def test_no_decay_without_variables_or_coefficient():
    _, _, _, kernel = _inputs()
    assert float(objective.weight_decay_loss([], WD)) == 0.0
    assert float(objective.weight_decay_loss([kernel], 0.0)) == 0.0
