"""Training-health monitors: is the representation collapsing?

Two statistics of one training batch, cheap enough for every
`steps_per_loop` (an l2-normalisation and one small SVD per replica):

- `projection_std`: the std over the batch of the l2-normalised
  projections, per dimension, averaged over dimensions (the collapse
  monitor of SimSiam, Chen & He 2021, §4.1). Complete collapse (every
  image maps to one direction) gives 0; projections spread isotropically
  on the unit sphere give 1/sqrt(d).
- `rankme`: the effective rank of a batch of encoder features (RankMe,
  Garrido et al. 2023, arXiv:2210.02885): exp of the entropy of the
  singular values normalised to sum 1. A rank-k batch with k equal
  singular values gives k; complete collapse gives 1; at most
  min(rows, feature dim).

`CollapseDetector` turns the two into one warning in the log when they
stay below their thresholds for several consecutive logs.
"""

from __future__ import annotations

import math

import tensorflow as tf
from absl import logging

# RankMe's epsilon (Garrido et al. 2023, eq. 1; suited to float32).
RANKME_EPSILON = 1e-7
# Collapse thresholds. Projection std: below 10 % of the isotropic value
# 1/sqrt(d). RankMe: below 1 % of the way from 1 (complete collapse) to
# its largest possible value min(rows, feature dim). Measured at
# initialisation (training-mode forward, random images, 128 images = 256
# rows): std * sqrt(d) = 1.00 and RankMe 121 of 256 (ResNet-18, 32x32),
# 195 of 256 (ResNet-50, 64x64): far above both.
PROJ_STD_COLLAPSE_FRACTION = 0.1
RANKME_COLLAPSE_FRACTION = 0.01
# Consecutive logs below a threshold before the warning.
COLLAPSE_PATIENCE = 5


def projection_std(projections: tf.Tensor) -> tf.Tensor:
    """Per-dimension std of the l2-normalised projections, averaged.

    Args:
      projections: (n, d) projection-head outputs of one batch (any float
        dtype; computed in float32).

    Returns:
      A float32 scalar: 0 for collapsed projections, about 1/sqrt(d) for
      isotropic ones.
    """
    z = tf.math.l2_normalize(tf.cast(projections, tf.float32), axis=1)
    return tf.reduce_mean(tf.math.reduce_std(z, axis=0))  # Biased std.


def rankme(features: tf.Tensor) -> tf.Tensor:
    """RankMe effective rank of a batch of features.

    p_k = sigma_k / sum_j sigma_j + eps over the singular values sigma of
    the (uncentred) features, and RankMe = exp(-sum_k p_k log p_k).

    Args:
      features: (n, d) encoder features of one batch (any float dtype;
        computed in float32).

    Returns:
      A float32 scalar in [1, min(n, d)] (up to eps).
    """
    singular = tf.linalg.svd(tf.cast(features, tf.float32), compute_uv=False)
    total = tf.maximum(tf.reduce_sum(singular), 1e-30)  # All-zero rows.
    p = singular / total + RANKME_EPSILON
    return tf.exp(-tf.reduce_sum(p * tf.math.log(p)))


def collapse_thresholds(
    proj_dim: int, rows: int, feature_dim: int
) -> tuple[float, float]:
    """(projection-std threshold, RankMe threshold) for these shapes.

    Args:
      proj_dim: width d of the projections given to `projection_std`.
      rows: rows of the feature batch given to `rankme`.
      feature_dim: width of those features.
    """
    std_threshold = PROJ_STD_COLLAPSE_FRACTION / math.sqrt(proj_dim)
    max_rank = min(rows, feature_dim)
    rank_threshold = 1.0 + RANKME_COLLAPSE_FRACTION * (max_rank - 1)
    return std_threshold, rank_threshold


class CollapseDetector:
    """Warns once when the representation looks collapsed.

    Call `update` at every log with the logged `projection_std` and
    `rankme`. When either stays below its threshold
    (`collapse_thresholds`) for `patience` consecutive logs, one warning
    names the values and the usual causes; it warns again only after the
    statistics have recovered and collapsed anew.

    Args:
      proj_dim: width of the projections (`proj_out_dim`, or the encoder
        width when `proj_head_mode=none`).
      rows: rows of the batch RankMe is computed on.
      feature_dim: width of the encoder features.
      patience: consecutive low logs before the warning.
    """

    def __init__(
        self,
        proj_dim: int,
        rows: int,
        feature_dim: int,
        patience: int = COLLAPSE_PATIENCE,
    ):
        self.std_threshold, self.rank_threshold = collapse_thresholds(
            proj_dim, rows, feature_dim
        )
        self.isotropic_std = 1.0 / math.sqrt(proj_dim)
        self.patience = patience
        self._low_logs = 0
        self._warned = False

    def update(
        self, step: int, proj_std: float | None, rank: float | None
    ) -> bool:
        """Records one log; returns True when it warned.

        Args:
          step: the global step of the log.
          proj_std: the logged `projection_std`, or None if not computed.
          rank: the logged `rankme`, or None if not computed.
        """
        low_std = proj_std is not None and proj_std < self.std_threshold
        low_rank = rank is not None and rank < self.rank_threshold
        if not (low_std or low_rank):
            self._low_logs, self._warned = 0, False
            return False
        self._low_logs += 1
        if self._warned or self._low_logs < self.patience:
            return False
        self._warned = True
        logging.warning(self._message(step, proj_std, rank))
        return True

    def _message(self, step, proj_std, rank) -> str:
        values = []
        if proj_std is not None:
            values.append(
                f"train/proj_std = {proj_std:.4g} (collapse < "
                f"{self.std_threshold:.3g}, isotropic "
                f"{self.isotropic_std:.3g})"
            )
        if rank is not None:
            values.append(
                f"train/rankme = {rank:.4g} (collapse < "
                f"{self.rank_threshold:.3g})"
            )
        return (
            f"Step {step}: the representation looks collapsed for "
            f"{self._low_logs} consecutive logs: {'; '.join(values)}. "
            "Usual causes: a learning rate too high for the batch (check "
            "--learning_rate, --learning_rate_scaling, --warmup_epochs), a "
            "--temperature far from 0.1-0.5, or a batch too small to give "
            "enough negatives (--train_batch_size)."
        )
