"""Step arithmetic, learning-rate schedule and optimisers (SPEC.md §6).

Everything here takes plain values: the experiment reads them from the run
config once. The step arithmetic (batch-size scaling, warm-up steps, total
steps, checkpoint cadence) follows the reference's integer formulas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import tensorflow as tf

from simclr_tf import lars
from simclr_tf.config import LR_SCALINGS, OPTIMIZERS
from simclr_tf.models.simclr_model import WeightGroups


def scaled_learning_rate(
    learning_rate: float, scaling: str, global_batch: int
) -> float:
    """The peak learning rate after batch-size scaling (SPEC.md §6).

    Args:
      learning_rate: the base learning rate (`--learning_rate`).
      scaling: "linear" (lr * B / 256) or "sqrt" (lr * sqrt(B)).
      global_batch: the global batch size B.

    Returns:
      The peak learning rate.

    Raises:
      ValueError: an unknown scaling.
    """
    if scaling == "linear":
        return learning_rate * global_batch / 256.0
    if scaling == "sqrt":
        return learning_rate * math.sqrt(global_batch)
    raise ValueError(
        f"Received: learning_rate_scaling={scaling!r}. "
        f"Use one of {', '.join(LR_SCALINGS)}."
    )


def total_train_steps(
    train_steps: int, train_epochs: int, num_examples: int, global_batch: int
) -> int:
    """`train_steps`, or epochs converted to steps as the reference does."""
    if train_steps:
        return train_steps
    return num_examples * train_epochs // global_batch + 1


def warmup_steps(
    warmup_epochs: float, num_examples: int, global_batch: int
) -> int:
    """round(warmup_epochs * num_examples // B), as in the reference."""
    return int(round(warmup_epochs * num_examples // global_batch))


def checkpoint_every(
    checkpoint_steps: int,
    checkpoint_epochs: int,
    num_examples: int,
    global_batch: int,
) -> int:
    """Steps between checkpoints: `checkpoint_steps`, else from epochs.

    An epoch is round(num_examples / B) steps here, as in the reference
    (50,000 / 512 -> 98), unlike the floor of `total_train_steps`.
    """
    if checkpoint_steps:
        return checkpoint_steps
    steps_per_epoch = max(1, round(num_examples / global_batch))
    return max(1, checkpoint_epochs * steps_per_epoch)


@keras.saving.register_keras_serializable(package="simclr_tf")
class WarmUpAndCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to a peak, then cosine decay to 0 (reference schedule).

    lr(step) = step / warmup_steps * peak            for step < warmup_steps
             = peak * (1 + cos(pi * t)) / 2          otherwise, with
    t = min(step - warmup_steps, D) / D and D = total_steps - warmup_steps
    (Keras `CosineDecay` with alpha 0, as in the reference). With
    warmup_steps = 0 the schedule starts at the peak.

    Args:
      peak_learning_rate: the learning rate after batch-size scaling.
      warmup_steps: steps of linear warm-up (>= 0).
      total_steps: steps of the whole run (>= 1). When it does not exceed
        warmup_steps the cosine part is never reached (D is taken as 1).
    """

    def __init__(
        self, peak_learning_rate: float, warmup_steps: int, total_steps: int
    ):
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(
                f"Received: warmup_steps={warmup_steps}, total_steps="
                f"{total_steps}. Use warmup_steps >= 0 and total_steps >= 1."
            )
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        peak = self.peak_learning_rate
        warmup = float(self.warmup_steps)
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = tf.minimum(step - warmup, decay_steps) / decay_steps
        # (1 + cos(pi t)) / 2 = cos(pi t / 2)^2, without the float32
        # cancellation of 1 + cos near the end of the run.
        cosine = peak * tf.square(tf.cos(0.5 * math.pi * progress))
        if not self.warmup_steps:
            return cosine
        return tf.where(step < warmup, step / warmup * peak, cosine)

    def get_config(self) -> dict:
        """The constructor arguments."""
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
        }


def build_optimizer(
    name: str,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    momentum: float,
    weight_decay: float,
    lars_exclusions: Sequence = (),
) -> keras.optimizers.Optimizer:
    """The optimiser of `--optimizer`, as in the reference.

    Create it (and call `build` on the variables) inside the strategy scope.

    Args:
      name: "lars", "momentum" or "adam".
      learning_rate: a float or a schedule.
      momentum: the momentum of LARS and SGD.
      weight_decay: LARS's coupled weight decay (the others carry it in
        the loss, see `decayed_variables`).
      lars_exclusions: variables LARS gives neither decay nor trust ratio
        (`SimCLRModel.weight_groups.lars_exclusions`).

    Returns:
      LARS (weight decay in the update, exclusions as given), SGD with
      Nesterov momentum, or Adam (both without decay: it is in the loss).

    Raises:
      ValueError: an unknown optimizer name.
    """
    if name == "lars":
        return lars.LARS(
            learning_rate,
            momentum=momentum,
            weight_decay=weight_decay,
            exclude_from_weight_decay=lars_exclusions,
        )
    if name == "momentum":
        return keras.optimizers.SGD(
            learning_rate, momentum=momentum, nesterov=True
        )
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    raise ValueError(
        f"Received: optimizer={name!r}. Use one of {', '.join(OPTIMIZERS)}."
    )


def decayed_variables(
    optimizer_name: str,
    groups: WeightGroups,
    trainable_variables: Sequence,
) -> list:
    """The variables whose squared norm the loss carries (SPEC.md §6).

    LARS decays the other weights itself, so the loss only holds the
    supervised head's kernels. Momentum and Adam decay every trainable
    variable except batch-norm parameters (biases included, as the
    reference's name filter 'batch_normalization' does).

    Args:
      optimizer_name: "lars", "momentum" or "adam".
      groups: the model's `WeightGroups`.
      trainable_variables: the model's trainable variables, in order.

    Returns:
      The decayed variables, in the model's order.
    """
    if optimizer_name == "lars":
        biases = {id(v) for v in groups.biases}
        return [
            v
            for v in groups.supervised_head
            if v.trainable and id(v) not in biases
        ]
    bn = {id(v) for v in groups.batch_norm}
    return [v for v in trainable_variables if id(v) not in bn]
