"""Tests of simclr_tf.evaluation: weighted kNN against NumPy, results."""

import json

import numpy as np
import pytest

from simclr_tf import config as config_lib
from simclr_tf import evaluation


def _numpy_weighted_knn(query, bank, bank_labels, num_classes, k, t):
    """Written from the definition: cosine top-k, exp(sim / t) votes."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    predictions = []
    for row in q @ b.T:
        nearest = np.argsort(-row, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for j in nearest:
            scores[bank_labels[j]] += np.exp(row[j] / t)
        predictions.append(np.argmax(scores))
    return np.array(predictions)


@pytest.mark.parametrize(
    "k, t, chunk", [(1, 0.07, 1024), (5, 0.5, 7), (50, 0.1, 3)]
)
def test_weighted_knn_matches_numpy(k, t, chunk):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(40, 8)).astype(np.float32)
    labels = rng.integers(0, 4, size=40)
    query = rng.normal(size=(17, 8)).astype(np.float32)
    got = evaluation.weighted_knn_predict(
        query,
        bank,
        labels,
        num_classes=4,
        k=k,
        temperature=t,
        chunk_size=chunk,
    ).numpy()
    expected = _numpy_weighted_knn(query, bank, labels, 4, min(k, 40), t)
    np.testing.assert_array_equal(got, expected)


def test_weighted_knn_separable_clusters_are_perfect():
    # Two clusters on opposite directions: every query finds its own class.
    rng = np.random.default_rng(1)
    centres = np.array([[1.0, 0.0], [-1.0, 0.0]])
    labels = np.repeat([0, 1], 20)
    bank = centres[labels] + 0.05 * rng.normal(size=(40, 2))
    query = centres[[0, 1, 1, 0]] + 0.05 * rng.normal(size=(4, 2))
    got = evaluation.weighted_knn_predict(
        query.astype(np.float32),
        bank.astype(np.float32),
        labels,
        num_classes=2,
        k=10,
        temperature=0.07,
    ).numpy()
    np.testing.assert_array_equal(got, [0, 1, 1, 0])


def test_write_results_files(tmp_path):
    config = config_lib.from_flat({"model_dir": str(tmp_path)})
    results = {
        "global_step": 7,
        "eval/label_top_1_accuracy": 0.5,
        "eval/label_top_5_accuracy": 0.75,
        "eval/regularization_loss": 0.01,
    }
    evaluation.write_results(config, results, writer=None)
    for name in ("result.json", "result_7.json"):
        # Numbers only, as the reference: metric names and global_step.
        record = json.loads((tmp_path / name).read_text())
        assert record == results
    flags = json.loads((tmp_path / "flags.json").read_text())
    assert flags == config_lib.to_flat(config)
    assert flags["model_dir"] == str(tmp_path)
