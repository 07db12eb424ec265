"""The replica training step and the host loop that runs several of them.

One replica step: forward, the objective's total loss (NT-Xent with
cross-replica negatives, supervised cross-entropy, weight decay; see
`simclr_tf.objective`), loss / num_replicas (gradients are summed across
replicas by the optimizer), gradients, update. The loop runs `num_steps`
replica steps inside one `tf.function` and returns the mean of each metric
over them, averaged over replicas, and the objective's monitors (health
statistics with an SVD, too costly for every step) of the last step only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from simclr_tf.training import grad_cache


def make_replica_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    objective: Callable,
    grad_cache_chunk_size: int = 0,
) -> Callable:
    """Returns `step(images, labels, monitor=False) -> metrics` for
    `strategy.run`.

    The metrics are the objective's `metric_names` and, when it has
    `monitor_names`, those too: computed on the step's outputs when the
    boolean `monitor` is true, else 0 (their cost is then skipped).

    Args:
      model: the built model.
      optimizer: its optimizer, built on `model.trainable_variables`.
      objective: `objective(outputs, labels, replica_context) -> (total,
        metrics)` with `output_keys` and `targets(images)` (extra loss
        inputs merged into `outputs`; see `simclr_tf.objective`).
      grad_cache_chunk_size: 0, or the images per forward/backward chunk of
        gradient caching (batch-norm statistics are then per chunk).
    """
    variables = model.trainable_variables
    chunk = grad_cache_chunk_size
    # The outputs the loss and the monitors read: the only ones grad
    # caching keeps whole.
    output_keys = list(objective.output_keys)
    monitor_names = list(getattr(objective, "monitor_names", ()))

    def step(images, labels, monitor=False):
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync
        # Inputs of the loss that do not come from the model (a teacher's
        # logits), computed once per local batch outside the tape: grad
        # caching's chunks then see them whole, as the other outputs.
        targets = objective.targets(images)

        def loss_fn(outputs):
            total, metrics = objective({**outputs, **targets}, labels, ctx)
            if monitor_names:
                metrics = {
                    **metrics,
                    **_monitors(objective, outputs, monitor, monitor_names),
                }
            return total, metrics

        loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        if chunk:
            (total, metrics), grads = grad_cache.grad_cache_gradients(
                model,
                images,
                loss_fn,
                chunk_size=chunk,
                variables=variables,
                loss_scale=(
                    optimizer.scale_loss(1.0 / replicas)
                    if loss_scaled
                    else 1.0 / replicas
                ),
                output_keys=output_keys,
            )
        else:
            with tf.GradientTape() as tape:
                outputs = model(images, training=True)
                total, metrics = loss_fn(outputs)
                scaled = total / replicas
                if loss_scaled:
                    scaled = optimizer.scale_loss(scaled)
            grads = tape.gradient(scaled, variables)
        # Parts the loss does not use (the projection head when fine-tuning
        # from its input) have no gradient.
        optimizer.apply_gradients(
            (g, v)
            for g, v in zip(grads, variables, strict=True)
            if g is not None
        )
        return metrics

    return step


def _monitors(objective, outputs, monitor, names) -> dict[str, tf.Tensor]:
    """`objective.monitors(outputs)` when `monitor`, else zeros."""
    return tf.cond(
        tf.convert_to_tensor(monitor, tf.bool),
        lambda: objective.monitors(outputs),
        lambda: {name: tf.constant(0.0) for name in names},
    )


def make_train_loop(
    strategy: tf.distribute.Strategy,
    replica_step: Callable,
    names: list[str],
    jit_compile: bool = False,
    monitor_names: Sequence[str] = (),
) -> Callable:
    """Returns `loop(iterator, num_steps) -> {name: value}`.

    The whole loop is one `tf.function`, so the host is visited once per
    `num_steps` steps; with `jit_compile` the replica step is XLA-compiled.
    Each of `names` is its mean over the steps; each of `monitor_names`
    (the objective's monitors) is its value at the last step, where the
    replica step is asked to compute them. Both are averaged over
    replicas. The loop is traced without AutoGraph: `replica_step` and what
    it calls must use `tf.cond`/`tf.while_loop` for tensor-valued control
    flow.
    """
    if jit_compile:
        replica_step = tf.function(
            replica_step, jit_compile=True, autograph=False
        )
    monitor_names = list(monitor_names)

    def mean(per_replica, name):
        return strategy.reduce(
            tf.distribute.ReduceOp.MEAN, per_replica[name], axis=None
        )

    # Traced without AutoGraph: converting the source of the step and of
    # everything it calls was half of the first call's tracing (about 1 s
    # for a ResNet-18 on a 2-core CPU), and nothing here branches on a
    # tensor in Python (tf.cond / tf.while_loop are written out).
    @tf.function(autograph=False)
    def loop(iterator, num_steps):
        def body(i, sums, last):
            images, labels = next(iterator)
            args = (images, labels)
            if monitor_names:
                args += (tf.equal(i, num_steps - 1),)
            per_replica = strategy.run(replica_step, args=args)
            sums = {
                name: sums[name] + mean(per_replica, name) for name in names
            }
            # Overwritten each step: the last step's values remain.
            last = {name: mean(per_replica, name) for name in monitor_names}
            return i + 1, sums, last

        _, sums, last = tf.while_loop(
            lambda i, sums, last: i < num_steps,
            body,
            (
                tf.zeros_like(num_steps),
                {name: tf.constant(0.0) for name in names},
                {name: tf.constant(0.0) for name in monitor_names},
            ),
        )
        steps = tf.cast(num_steps, tf.float32)
        return {**{k: v / steps for k, v in sums.items()}, **last}

    return loop
