"""Evaluation: linear-head top-1/top-5, a weighted kNN monitor, results.

With `--eval_logistic_regression`, also scikit-learn's logistic regression
on standardised frozen features (`logistic_regression_accuracy`).

The kNN monitor classifies eval images by their k nearest training images
in encoder-feature space (cosine similarity), each neighbour voting for its
class with weight exp(similarity / T) — the monitor of InstDisc (Wu et al.
2018) as used by the PyTorch SimCLR libraries (k = 200, T = 0.07).

Evaluation computes in float32 whatever the training precision: a run
trained under a bfloat16 policy is evaluated on a float32 copy of its
weights (`export.float32_copy`, the model the SavedModel export holds), so
logits and kNN similarities do not tie from bfloat16 rounding.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib
from simclr_tf import export, objective, optim
from simclr_tf.data import input_pipeline, sources

FEATURE_KEY = "final_avg_pool"


def weighted_knn_predict(
    query: tf.Tensor,
    bank: tf.Tensor,
    bank_labels: tf.Tensor,
    *,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int = 1024,
) -> tf.Tensor:
    """Predicted class of each query row by weighted kNN over `bank`.

    Args:
      query: (q, d) features; L2-normalised inside.
      bank: (m, d) features of the labelled memory bank.
      bank_labels: (m,) int class ids of the bank.
      num_classes: number of classes.
      k: neighbours (capped at m).
      temperature: the vote of a neighbour is exp(cosine / temperature).
      chunk_size: query rows per similarity matrix, to bound memory.

    Returns:
      (q,) int64 predicted class ids.
    """
    bank = tf.math.l2_normalize(tf.cast(bank, tf.float32), axis=1)
    query = tf.math.l2_normalize(tf.cast(query, tf.float32), axis=1)
    k = min(k, int(bank.shape[0]))
    predictions = []
    for start in range(0, int(query.shape[0]), chunk_size):
        sim = tf.matmul(
            query[start : start + chunk_size], bank, transpose_b=True
        )
        top_sim, top_idx = tf.math.top_k(sim, k=k)  # (c, k)
        votes = tf.one_hot(tf.gather(bank_labels, top_idx), num_classes)
        weights = tf.exp(top_sim / temperature)[..., None]  # (c, k, 1)
        scores = tf.reduce_sum(votes * weights, axis=1)  # (c, classes)
        predictions.append(tf.argmax(scores, axis=1))
    return tf.concat(predictions, axis=0)


def _features_and_labels(model, dataset, max_batches=None):
    feats, labels = [], []
    for i, (images, one_hot) in enumerate(dataset):
        if max_batches and i >= max_batches:
            break
        feats.append(model(images, training=False)[FEATURE_KEY])
        labels.append(tf.argmax(one_hot, axis=1))
    return tf.concat(feats, 0), tf.concat(labels, 0)


class FrozenFeatures(NamedTuple):
    """Encoder features (`final_avg_pool`) and int labels of two splits."""

    train: tf.Tensor  # (m, d): `knn_train_examples` training images.
    train_labels: tf.Tensor  # (m,)
    eval: tf.Tensor  # (q, d): the eval split (`eval_steps` batches if set).
    eval_labels: tf.Tensor  # (q,)


def frozen_features(
    config: config_lib.Config, model: keras.Model, source: sources.Source
) -> FrozenFeatures:
    """Features of `knn_train_examples` training images and of the eval
    split, both with eval preprocessing, for the kNN monitor and the
    logistic-regression evaluation."""
    ev, data = config.eval, config.data
    batch = ev.eval_batch_size

    def split_dataset(split):
        return input_pipeline.build_dataset(
            source, data, batch_size=batch, is_training=False, split=split
        )

    bank_batches = -(-ev.knn_train_examples // batch)
    bank, bank_labels = _features_and_labels(
        model, split_dataset(data.train_split), bank_batches
    )
    query, query_labels = _features_and_labels(
        model, split_dataset(data.eval_split), ev.eval_steps or None
    )
    return FrozenFeatures(
        bank[: ev.knn_train_examples],
        bank_labels[: ev.knn_train_examples],
        query,
        query_labels,
    )


def knn_accuracy(
    config: config_lib.Config,
    model: keras.Model,
    source: sources.Source,
    features: FrozenFeatures | None = None,
) -> float:
    """Top-1 accuracy of the weighted kNN monitor on the eval split, with
    `knn_train_examples` training images (eval preprocessing) as bank.

    `features` reuses features already computed by `frozen_features`."""
    if features is None:
        features = frozen_features(config, model, source)
    predicted = weighted_knn_predict(
        features.eval,
        features.train,
        features.train_labels,
        num_classes=source.info.num_classes,
        k=config.eval.knn_k,
        temperature=config.eval.knn_temperature,
    )
    hits = tf.cast(tf.equal(predicted, features.eval_labels), tf.float32)
    return float(tf.reduce_mean(hits))


def _import_sklearn():
    try:
        from sklearn import linear_model, pipeline, preprocessing
    except ImportError as e:
        raise ImportError(
            "The logistic-regression evaluation (--eval_logistic_regression)"
            " needs scikit-learn: pip install 'simclr_tf[quickstart]'."
        ) from e
    return linear_model, pipeline, preprocessing


def logistic_regression_accuracy(
    train_features,
    train_labels,
    eval_features,
    eval_labels,
    *,
    c: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Top-1 of a logistic regression fitted on frozen features.

    The offline linear-evaluation protocol: a `sklearn.pipeline` of
    `StandardScaler` (per-feature mean and variance of the training
    features) and L2-regularised multinomial `LogisticRegression` (L-BFGS,
    inverse regularisation strength `c`, scikit-learn's default 1.0),
    fitted on the training features and scored on the eval features. It
    needs scikit-learn (`pip install 'simclr_tf[quickstart]'`).

    Args:
      train_features: (m, d) features of the training images.
      train_labels: (m,) int labels.
      eval_features: (q, d) features of the eval images.
      eval_labels: (q,) int labels.
      c: `LogisticRegression`'s C (larger = weaker regularisation).
      max_iter: L-BFGS iterations at most.

    Returns:
      The fraction of eval images whose predicted class is the label.

    Raises:
      ImportError: scikit-learn is not installed (says how to install it).
    """
    linear_model, pipeline, preprocessing = _import_sklearn()
    classifier = pipeline.make_pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(C=c, max_iter=max_iter),
    )
    classifier.fit(np.asarray(train_features), np.asarray(train_labels))
    return float(
        classifier.score(np.asarray(eval_features), np.asarray(eval_labels))
    )


def classification_hits(
    logits: tf.Tensor, labels: tf.Tensor, top: int
) -> tf.Tensor:
    """[top-1 hits, top-`top` hits, rows] of one batch, as float32.

    Top-1 is argmax(logits) == label, as the reference's accuracy metric:
    of tied classes only the first counts (an all-equal row is one guess,
    not a hit for every class). Top-`top` is `tf.math.in_top_k`, which
    counts ties at the k-th place as hits, as the reference's top-5.

    Args:
      logits: (B, classes) scores; compared in float32.
      labels: (B,) int class ids.
      top: k of the second count.
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    predicted = tf.argmax(logits, axis=1, output_type=tf.int32)
    hit1 = tf.equal(predicted, labels)
    hitk = tf.math.in_top_k(labels, logits, top)
    return tf.stack(
        [
            tf.reduce_sum(tf.cast(hit1, tf.float32)),
            tf.reduce_sum(tf.cast(hitk, tf.float32)),
            tf.cast(tf.shape(labels)[0], tf.float32),
        ]
    )


def linear_accuracy(
    config: config_lib.Config,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    source: sources.Source,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of the supervised head on the eval split."""
    dataset = input_pipeline.build_distributed_dataset(
        strategy,
        source,
        config.data,
        global_batch_size=config.eval.eval_batch_size,
        is_training=False,
        split=config.data.eval_split,
    )
    top = min(5, source.info.num_classes)

    @tf.function
    def eval_step(images, one_hot):
        def replica(images, one_hot):
            logits = model(images, training=False)["logits_sup"]
            labels = tf.argmax(one_hot, axis=1, output_type=tf.int32)
            return classification_hits(logits, labels, top)

        per_replica = strategy.run(replica, args=(images, one_hot))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, None)

    totals = tf.zeros(3)
    for i, (images, one_hot) in enumerate(dataset):
        if config.eval.eval_steps and i >= config.eval.eval_steps:
            break
        totals += eval_step(images, one_hot)
    hit1, hit5, count = (float(x) for x in totals)
    if count == 0:
        raise ValueError(
            f"The eval split {config.data.eval_split!r} of "
            f"{config.data.dataset!r} yielded no images."
        )
    return hit1 / count, hit5 / count


def evaluate(
    config: config_lib.Config,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    source: sources.Source,
    step: int,
) -> dict[str, float]:
    """All eval metrics of the current weights, keyed by TensorBoard name.

    Computed in float32 whatever the training precision (module doc).
    """
    results: dict[str, float] = {"global_step": step}
    labelled = source.info.labelled
    head = model.supervised_head
    # The head's classes: a distilled student's are its teacher's, also on
    # unlabelled data.
    num_classes = head.num_classes if head is not None else None
    with strategy.scope():
        model = export.float32_copy(config, model, num_classes)
    if labelled and model.supervised_head is not None:
        top1, top5 = linear_accuracy(config, strategy, model, source)
        results["eval/label_top_1_accuracy"] = top1
        results["eval/label_top_5_accuracy"] = top5
    decayed = optim.decayed_variables(
        config.optim.optimizer, model.weight_groups, model.trainable_variables
    )
    results["eval/regularization_loss"] = float(
        objective.weight_decay_loss(decayed, config.optim.weight_decay)
    )
    ev = config.eval
    if labelled and (ev.knn_k or ev.eval_logistic_regression):
        features = frozen_features(config, model, source)
        if ev.knn_k:
            results["eval/knn_top_1_accuracy"] = knn_accuracy(
                config, model, source, features
            )
        if ev.eval_logistic_regression:
            results["eval/logreg_top_1_accuracy"] = (
                logistic_regression_accuracy(
                    *features, c=ev.logistic_regression_c
                )
            )
    logging.info("Eval at step %d: %s", step, results)
    return results


def write_results(
    config: config_lib.Config,
    results: dict[str, float],
    writer: tf.summary.SummaryWriter | None,
) -> None:
    """Writes the results files and eval summaries.

    As the reference: `result.json` and `result_<step>.json` hold numbers
    only (the metric names and `global_step`), and `flags.json` beside them
    the run's flags as a flat name -> value dict.
    """
    step = int(results["global_step"])
    model_dir = config.train.model_dir
    files = {
        "result.json": results,
        f"result_{step}.json": results,
        "flags.json": config_lib.to_flat(config),
    }
    for name, record in files.items():
        with tf.io.gfile.GFile(os.path.join(model_dir, name), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
    if writer is not None:
        with writer.as_default(step=step):
            for key, value in results.items():
                if key.startswith("eval/"):
                    tf.summary.scalar(key, value)
        writer.flush()
