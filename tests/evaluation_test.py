"""Tests of simclr_tf.evaluation: weighted kNN against NumPy, results."""

import importlib.util
import json
import sys

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

from simclr_tf import config as config_lib
from simclr_tf import evaluation
from simclr_tf.data import input_pipeline, sources
from simclr_tf.models import factory
from tests.helpers import two_replica_strategy


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


def test_classification_hits_top1_is_argmax_with_ties():
    # All-equal rows are one guess (the first class), not a hit for every
    # class; top-5 keeps in_top_k's counting (ties at the 5th place hit).
    labels = np.array([0, 3, 1, 2])
    logits = np.zeros((4, 6), np.float32)
    logits[2] = [0, 5, 5, 0, 0, 0]  # Tie of classes 1 and 2: argmax is 1.
    hit1, hit5, rows = evaluation.classification_hits(logits, labels, 5)
    expected_top1 = np.sum(np.argmax(logits, axis=1) == labels)
    assert expected_top1 == 2  # Rows 0 and 2.
    assert (float(hit1), float(rows)) == (expected_top1, 4.0)
    assert float(hit5) == 4.0  # Every label is among the 5 largest (ties).


def _eval_config(tmp_path, **overrides):
    flat = dict(
        dataset="cifar10",
        eval_split="test",
        image_size=32,
        resnet_depth=18,
        resnet_base_width=8,
        eval_batch_size=8,
        eval_steps=2,
        knn_k=0,
        model_dir=str(tmp_path),
    )
    flat.update(overrides)
    return config_lib.from_flat(flat)


def _eval_labels(config):
    labels = []
    dataset = input_pipeline.build_dataset(
        sources.open_source(config.data),
        config.data,
        batch_size=8,
        is_training=False,
    )
    for _, one_hot in dataset.take(config.eval.eval_steps):
        labels.append(np.argmax(one_hot.numpy(), axis=1))
    return np.concatenate(labels)


def _model_with_head(config, strategy, kernel):
    with strategy.scope():
        model = factory.build_model(config, 10)
        model.supervised_head.dense.kernel.assign(kernel)
        model.supervised_head.dense.bias.assign(np.zeros(10, np.float32))
    return model


def test_linear_accuracy_of_an_all_zero_head_is_one_guess(tmp_path):
    # mode=eval of a --checkpoint with zero_init_logits_layer: every logit
    # is 0, argmax says class 0, so top-1 = the share of class 0 (in_top_k
    # k=1 reported 100 %).
    config = _eval_config(tmp_path)
    strategy = two_replica_strategy()
    with tfds.testing.mock_data(num_examples=48):
        source = sources.open_source(config.data)
        labels = _eval_labels(config)
        model = _model_with_head(
            config, strategy, np.zeros((8 * 8, 10), np.float32)
        )
        top1, top5 = evaluation.linear_accuracy(config, strategy, model, source)
    assert len(labels) == 16
    assert top1 == pytest.approx(np.mean(labels == 0))
    assert top1 < 1.0
    assert top5 == 1.0  # in_top_k: every class ties for the top 5.


def test_linear_accuracy_is_computed_in_float32_under_bfloat16(tmp_path):
    # Class 1's kernel column is class 0's times (1 + 2^-10): equal after
    # rounding to bfloat16 (8-bit mantissa), so bfloat16 logits tie and
    # argmax says class 0; in float32 class 1 wins (features >= 0 after
    # ReLU). Evaluation must report the float32 answer.
    config = _eval_config(tmp_path, train_mode="finetune")
    strategy = two_replica_strategy()
    kernel = np.zeros((8 * 8, 10), np.float32)
    kernel[:, 0] = 1.0
    kernel[:, 1] = 1.0 + 2.0**-10
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    with tfds.testing.mock_data(num_examples=48):
        source = sources.open_source(config.data)
        labels = _eval_labels(config)
        model = _model_with_head(config, strategy, kernel)
        keras.mixed_precision.set_global_policy("float32")
        assert model.compute_dtype == "bfloat16"
        results = evaluation.evaluate(config, strategy, model, source, step=0)
    assert np.mean(labels == 1) != np.mean(labels == 0)  # Discriminates.
    assert results["eval/label_top_1_accuracy"] == pytest.approx(
        np.mean(labels == 1)
    )


def _digits_split():
    from sklearn import datasets

    digits = datasets.load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.target))
    train, test = order[:1400], order[1400:]
    x, y = digits.data.astype(np.float32), digits.target
    return x[train], y[train], x[test], y[test]


def test_logistic_regression_is_the_documented_protocol_on_digits():
    # Independent expectation: standardise with the training mean and
    # (population) std in NumPy, then a plain LogisticRegression(C).
    from sklearn.linear_model import LogisticRegression

    x_train, y_train, x_test, y_test = _digits_split()
    got = evaluation.logistic_regression_accuracy(
        x_train, y_train, x_test, y_test, c=0.5
    )
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # Constant pixels: StandardScaler leaves them.
    reference = LogisticRegression(C=0.5, max_iter=1000).fit(
        (x_train - mean) / std, y_train
    )
    expected = np.mean(reference.predict((x_test - mean) / std) == y_test)
    assert got == pytest.approx(expected, abs=1.0 / len(y_test))
    assert got > 0.9  # Raw-pixel logistic regression: about 96 % (FACTS).


def test_logistic_regression_ignores_feature_scale():
    # Standardised features: rescaling a feature changes nothing.
    x_train, y_train, x_test, y_test = _digits_split()
    scale = np.geomspace(1e-3, 1e3, x_train.shape[1]).astype(np.float32)
    plain = evaluation.logistic_regression_accuracy(
        x_train, y_train, x_test, y_test
    )
    scaled = evaluation.logistic_regression_accuracy(
        x_train * scale, y_train, x_test * scale, y_test
    )
    assert scaled == pytest.approx(plain, abs=1.0 / len(y_test))


def test_logistic_regression_separable_and_chance():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=600)
    centres = 10.0 * np.eye(3, 8)
    x = centres[labels] + rng.normal(size=(600, 8))
    train, test = slice(0, 400), slice(400, 600)
    separable = evaluation.logistic_regression_accuracy(
        x[train], labels[train], x[test], labels[test]
    )
    assert separable == 1.0
    # Labels independent of the features: about chance (1/3) on test.
    shuffled = rng.permutation(labels)
    chance = evaluation.logistic_regression_accuracy(
        x[train], shuffled[train], x[test], shuffled[test]
    )
    assert chance < 0.5


def test_logistic_regression_without_sklearn_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"simclr_tf\[quickstart\]"):
        evaluation.logistic_regression_accuracy(
            np.zeros((2, 1)), [0, 1], np.zeros((1, 1)), [0]
        )
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(config_lib.ConfigError, match="scikit-learn"):
        config_lib.from_flat({"eval_logistic_regression": True})


def test_evaluate_writes_logistic_regression_next_to_knn(tmp_path):
    config = _eval_config(
        tmp_path,
        train_mode="finetune",
        knn_k=5,
        knn_train_examples=16,
        eval_logistic_regression=True,
    )
    strategy = two_replica_strategy()
    with tfds.testing.mock_data(num_examples=48):
        source = sources.open_source(config.data)
        with strategy.scope():
            model = factory.build_model(config, 10)
        results = evaluation.evaluate(config, strategy, model, source, step=3)
        features = evaluation.frozen_features(config, model, source)
    assert features.train.shape[0] == 16
    assert features.eval.shape[0] == 16  # eval_steps=2 batches of 8.
    expected = evaluation.logistic_regression_accuracy(*features)
    assert results["eval/logreg_top_1_accuracy"] == pytest.approx(expected)
    assert "eval/knn_top_1_accuracy" in results
    evaluation.write_results(config, results, writer=None)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["eval/logreg_top_1_accuracy"] == pytest.approx(expected)
