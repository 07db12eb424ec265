"""LARS (You et al., 2017) as a Keras 3 optimizer (optimizer maths only).

Port of the reference `tf2/lars_optimizer.py` (SPEC.md §6). Per variable w
with gradient g, learning rate lr, momentum m and trust coefficient eeta:

    g <- g + weight_decay * w        unless w is excluded from weight decay
    trust = eeta * ||w|| / ||g||     if both norms > 0, else 1; 1 when w is
                                     excluded from layer adaptation
    v <- m * v + lr * trust * g      (classic momentum)
    w <- w - v

The weight decay is coupled (added to the gradient before the trust
ratio), so the base class's decoupled decay is switched off. Exclusions are
given as variable objects, never as name patterns: in SimCLR they are the
batch-norm parameters, all biases and the supervised head
(`SimCLRModel.weight_groups.lars_exclusions`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="simclr_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling with momentum.

    Args:
      learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
      momentum: momentum m in [0, 1).
      weight_decay: L2 coefficient added to the gradient (coupled decay).
      eeta: trust coefficient (0.001 in SimCLR).
      classic_momentum: True: the trust ratio scales the gradient before the
        momentum (the reference default). False: it scales the momentum
        update (the original LARS paper's form).
      use_nesterov: Nesterov momentum (off in SimCLR).
      exclude_from_weight_decay: variables that get no weight decay.
      exclude_from_layer_adaptation: variables whose trust ratio is 1;
        None means the same set as `exclude_from_weight_decay`, as in the
        reference.
      name: optimizer name.
      **kwargs: other `keras.optimizers.Optimizer` arguments (clipnorm, ...).

    The exclusion sets hold variable objects, so `get_config` cannot carry
    them: after `from_config`, pass them again (`LARS.from_config` does not
    know the model). Checkpoints (`tf.train.Checkpoint`) hold the momentum
    slots and the iteration count.
    """

    def __init__(
        self,
        learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eeta: float = 0.001,
        classic_momentum: bool = True,
        use_nesterov: bool = False,
        exclude_from_weight_decay: Sequence | None = None,
        exclude_from_layer_adaptation: Sequence | None = None,
        name: str = "LARS",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"Received: momentum={momentum}. Use a value in [0, 1)."
            )
        if eeta <= 0.0:
            raise ValueError(f"Received: eeta={eeta}. Use a positive value.")
        if weight_decay is not None and weight_decay < 0.0:
            raise ValueError(
                f"Received: weight_decay={weight_decay}. Use a value >= 0."
            )
        self.momentum = float(momentum)
        self.eeta = float(eeta)
        self.classic_momentum = bool(classic_momentum)
        self.use_nesterov = bool(use_nesterov)
        if exclude_from_layer_adaptation is None:
            exclude_from_layer_adaptation = exclude_from_weight_decay
        self._no_decay_keys = self._keys(exclude_from_weight_decay)
        self._no_adaptation_keys = self._keys(exclude_from_layer_adaptation)

    def _keys(self, variables: Iterable | None) -> frozenset:
        # `_var_key` maps a Keras variable, its tf.Variable and each
        # per-replica component of a distributed variable to one key.
        return frozenset(self._var_key(v) for v in (variables or ()))

    def build(self, variables):
        """Creates one momentum slot per variable.

        Args:
          variables: the trainable variables this optimizer will update.
        """
        if self.built:
            return
        super().build(variables)
        self._momentums = self.add_optimizer_variables(variables, "momentum")

    def _apply_weight_decay(self, variables):
        # LARS couples the decay into the gradient in `update_step`.
        del variables

    def _trust_ratio(self, param: tf.Tensor, direction: tf.Tensor):
        w_norm = tf.norm(param)
        d_norm = tf.norm(direction)
        return tf.where(
            w_norm > 0,
            tf.where(d_norm > 0, self.eeta * w_norm / d_norm, 1.0),
            1.0,
        )

    def update_step(self, gradient, variable, learning_rate):
        """Applies one LARS update to `variable` (SPEC.md §6)."""
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        grad = tf.cast(tf.convert_to_tensor(gradient), dtype)
        param = tf.convert_to_tensor(variable)
        key = self._var_key(variable)
        slot = self._momentums[self._get_variable_index(variable)]
        momentum = tf.cast(self.momentum, dtype)
        if self.weight_decay and key not in self._no_decay_keys:
            grad += tf.cast(self.weight_decay, dtype) * param
        adapt = key not in self._no_adaptation_keys
        if self.classic_momentum:
            trust = self._trust_ratio(param, grad) if adapt else 1.0
            scaled_lr = lr * tf.cast(trust, dtype)
            next_v = momentum * slot + scaled_lr * grad
            update = next_v
            if self.use_nesterov:
                update = momentum * next_v + scaled_lr * grad
        else:
            next_v = momentum * slot + grad
            update = next_v
            if self.use_nesterov:
                update = momentum * next_v + grad
            trust = self._trust_ratio(param, update) if adapt else 1.0
            update = lr * tf.cast(trust, dtype) * update
        self.assign(slot, next_v)
        self.assign_sub(variable, update)

    def get_config(self) -> dict:
        """The constructor arguments except the exclusion sets."""
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "eeta": self.eeta,
                "classic_momentum": self.classic_momentum,
                "use_nesterov": self.use_nesterov,
            }
        )
        return config
