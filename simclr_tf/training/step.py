"""The replica training step and the host loop that runs several of them.

One replica step: forward, the objective's total loss (NT-Xent with
cross-replica negatives, supervised cross-entropy, weight decay; see
`simclr_tf.objective`), loss / num_replicas (gradients are summed across
replicas by the optimizer), gradients, update. The loop runs `num_steps`
replica steps inside one `tf.function` and returns the mean of each metric
over them, averaged over replicas.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from simclr_tf.training import grad_cache


def make_replica_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    objective: Callable,
    grad_cache_chunk_size: int = 0,
) -> Callable:
    """Returns `step(images, labels) -> metrics` for `strategy.run`.

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
    # The outputs the loss reads: the only ones grad caching keeps whole.
    output_keys = list(objective.output_keys)

    def step(images, labels):
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync
        # Inputs of the loss that do not come from the model (a teacher's
        # logits), computed once per local batch outside the tape: grad
        # caching's chunks then see them whole, as the other outputs.
        targets = objective.targets(images)

        def loss_fn(outputs):
            return objective({**outputs, **targets}, labels, ctx)

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


def make_train_loop(
    strategy: tf.distribute.Strategy,
    replica_step: Callable,
    names: list[str],
    jit_compile: bool = False,
) -> Callable:
    """Returns `loop(iterator, num_steps) -> {name: mean over the steps}`.

    The whole loop is one `tf.function`, so the host is visited once per
    `num_steps` steps; with `jit_compile` the replica step is XLA-compiled.
    """
    if jit_compile:
        replica_step = tf.function(replica_step, jit_compile=True)

    @tf.function
    def loop(iterator, num_steps):
        sums = {name: tf.constant(0.0) for name in names}
        for _ in tf.range(num_steps):
            images, labels = next(iterator)
            per_replica = strategy.run(replica_step, args=(images, labels))
            sums = {
                name: sums[name]
                + strategy.reduce(
                    tf.distribute.ReduceOp.MEAN, per_replica[name], axis=None
                )
                for name in names
            }
        steps = tf.cast(num_steps, tf.float32)
        return {name: value / steps for name, value in sums.items()}

    return loop
