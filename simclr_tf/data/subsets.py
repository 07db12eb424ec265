"""Class-balanced labelled fractions of a split (`--label_fraction`).

SimCLRv2's semi-supervised protocol fine-tunes on 1 % or 10 % of ImageNet's
training labels. For ImageNet the reference uses fixed lists
(TFDS `imagenet2012_subset/1pct`, `/10pct`); for any other labelled source
this module draws the same kind of subset: from every class the same
fraction of its examples, chosen at random with a seed, so that a run can be
repeated exactly and the protocol applied to a user's own data.
"""

from __future__ import annotations

import numpy as np


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
