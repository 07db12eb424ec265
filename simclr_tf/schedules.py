"""Learning-rate schedule, optimisers and the weight-decay loss (SPEC §6).

The step arithmetic (batch-size scaling, warm-up steps, total steps) lives
in `simclr_tf.config` as pure functions; this module turns it into Keras
objects.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf import lars


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


def build_schedule(
    optim: config_lib.OptimConfig,
    num_examples: int,
    global_batch: int,
    total_steps: int,
) -> WarmUpAndCosine:
    """The run's schedule: scaled peak, warm-up steps from epochs.

    Args:
      optim: learning rate, its scaling and warm-up epochs.
      num_examples: examples in the training split.
      global_batch: the global batch size B.
      total_steps: `config.total_train_steps(...)` of the run.

    Returns:
      The schedule, called with the optimizer's iteration count.
    """
    return WarmUpAndCosine(
        config_lib.scaled_learning_rate(optim, global_batch),
        config_lib.warmup_steps(optim, num_examples, global_batch),
        total_steps,
    )


def build_optimizer(
    optim: config_lib.OptimConfig,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    model: keras.Model,
) -> keras.optimizers.Optimizer:
    """The optimiser of `--optimizer`, as in the reference.

    Create it (and call `build` on the variables) inside the strategy scope.

    Args:
      optim: optimizer name, momentum and weight decay.
      learning_rate: a float or a schedule.
      model: the built model; LARS takes its exclusion set from it.

    Returns:
      LARS (weight decay in the update, BN/bias/supervised head excluded),
      SGD with Nesterov momentum, or Adam (both without decay: it is in the
      loss, `weight_decay_loss`).

    Raises:
      ValueError: an unknown optimizer name.
    """
    if optim.optimizer == "lars":
        return lars.LARS(
            learning_rate,
            momentum=optim.momentum,
            weight_decay=optim.weight_decay,
            exclude_from_weight_decay=lars.lars_exclusions(model),
        )
    if optim.optimizer == "momentum":
        return keras.optimizers.SGD(
            learning_rate, momentum=optim.momentum, nesterov=True
        )
    if optim.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate)
    raise ValueError(
        f"Received: optimizer={optim.optimizer!r}. Use one of "
        f"{', '.join(config_lib.OPTIMIZERS)}."
    )


def weight_decay_variables(
    model: keras.Model, optim: config_lib.OptimConfig
) -> list:
    """The variables whose squared norm the loss carries (SPEC.md §6).

    LARS decays the other weights itself, so the loss only holds the
    supervised head's kernels. Momentum and Adam decay every trainable
    variable except batch-norm parameters (biases included, as the
    reference's name filter 'batch_normalization' does).
    """
    if optim.optimizer == "lars":
        biases = {id(v) for v in lars.bias_variables(model)}
        return [
            v
            for v in lars.supervised_head_variables(model)
            if v.trainable and id(v) not in biases
        ]
    bn = {id(v) for v in lars.batch_norm_variables(model)}
    return [v for v in model.trainable_variables if id(v) not in bn]


def weight_decay_loss(
    model: keras.Model, optim: config_lib.OptimConfig
) -> tf.Tensor:
    """weight_decay * sum(||w||^2 / 2) over `weight_decay_variables`.

    Args:
      model: the model.
      optim: optimizer name and weight_decay.

    Returns:
      Scalar float32 (0 when there is nothing to decay).
    """
    variables = weight_decay_variables(model, optim)
    if not variables or not optim.weight_decay:
        return tf.constant(0.0)
    total = tf.add_n([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in variables])
    return optim.weight_decay * total
