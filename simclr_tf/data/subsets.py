"""Class-balanced labelled fractions of a split (`--label_fraction`).

SimCLRv2's semi-supervised protocol fine-tunes on 1 % or 10 % of ImageNet's
training labels. For ImageNet the reference uses fixed lists
(TFDS `imagenet2012_subset/1pct`, `/10pct`); for any other labelled source
this module draws the same kind of subset: from every class the same
fraction of its examples, chosen at random with a seed, so that a run can be
repeated exactly and the protocol applied to a user's own data.
`sources.open_source` wraps a source in `LabelFractionSource` when
`label_fraction < 1`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib
from simclr_tf.data import sources


def class_balanced_subset(
    labels: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """Indices of a class-balanced random `fraction` of examples.

    Every class `c` with `n_c` examples keeps `max(1, round(fraction * n_c))`
    of them (at least one, so that no class disappears from a small
    subset), drawn without replacement by a generator seeded with `seed`.
    The same labels, fraction and seed always give the same indices; the
    draw for one class does not depend on the other classes' sizes.

    Args:
      labels: (n,) integer class index of each example, in split order.
      fraction: the fraction to keep, in (0, 1].
      seed: seed of the draw.

    Returns:
      Sorted int64 indices into `labels`.

    Raises:
      ValueError: `fraction` outside (0, 1] or `labels` not 1-D integers.
    """
    labels = np.asarray(labels)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"Received: label_fraction={fraction}. Use a value in (0, 1]."
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("labels must be a 1-D array of class indices.")
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep = max(1, int(round(fraction * members.size)))
        # One generator per class: a class's draw depends only on the seed,
        # the class and its members.
        rng = np.random.default_rng([seed, int(c)])
        chosen.append(rng.choice(members, size=keep, replace=False))
    if not chosen:
        return np.zeros((0,), np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


class LabelFractionSource(sources.Source):
    """A labelled source whose train split is a class-balanced fraction.

    Reading the train split gives only the examples
    `class_balanced_subset(labels, fraction, seed)` picks, in the split's
    fixed order (`shuffle_files` is ignored: the subset is defined on that
    order), then sharded over the input pipelines: each pass reads every
    record of the split (still encoded) and keeps the subset's. Every
    other split is the wrapped source's. The subset is drawn from the
    train split alone, so it is disjoint from the eval split and from a
    folder's held-out part. `info.num_train_examples` is the subset's
    size, which sets the steps per epoch, the warm-up and the total steps.

    Args:
      source: the opened, labelled source.
      data: the data config (`train_split`, `label_fraction`, `seed`; an
        unset seed draws with seed 0, so that runs without --seed still
        fine-tune on the same labels).

    Raises:
      DatasetError: the source has no labels.
    """

    def __init__(self, source: sources.Source, data: config_lib.DataConfig):
        source.info.require_labels(
            source.name,
            f"label_fraction={data.label_fraction}",
            "Use a labelled source (class subfolders, a labelled TFDS "
            "dataset) or --label_fraction=1.",
        )
        self.name = source.name
        self._source = source
        self._split = data.train_split
        seed = 0 if data.seed is None else data.seed
        labels = source.labels(data.train_split)
        self.indices = class_balanced_subset(labels, data.label_fraction, seed)
        self._keep = np.zeros(len(labels), bool)
        self._keep[self.indices] = True
        self.info = dataclasses.replace(
            source.info, num_train_examples=int(self.indices.size)
        )
        logging.info("%s", describe(labels, self.indices, data, seed))

    def records(
        self, split, *, input_context=None, shuffle_files=False, shuffle_seed=0
    ):
        if split != self._split:
            return self._source.records(
                split,
                input_context=input_context,
                shuffle_files=shuffle_files,
                shuffle_seed=shuffle_seed,
            )
        keep = tf.constant(self._keep)
        ds = self._source.records(split).enumerate()
        ds = ds.filter(lambda i, example: keep[i])
        ds = ds.map(lambda i, example: example)
        n, pid = sources.pipeline_index(input_context)
        return ds.shard(n, pid) if n > 1 else ds

    def decode(self, record):
        return self._source.decode(record)


def describe(
    labels: np.ndarray,
    indices: np.ndarray,
    data: config_lib.DataConfig,
    seed: int,
) -> str:
    """One line: kept images of all, and per class (min-max), for the log."""
    totals = np.bincount(labels)
    kept = np.bincount(labels[indices], minlength=totals.size)
    present = totals > 0
    return (
        f"label_fraction={data.label_fraction} (seed {seed}): training on "
        f"{indices.size} of {labels.size} images of split "
        f"{data.train_split!r}; per class {kept[present].min()}-"
        f"{kept[present].max()} kept of {totals[present].min()}-"
        f"{totals[present].max()}."
    )
