"""The replica training step and the host loop that runs several of them.

One replica step: forward, NT-Xent with cross-replica negatives (pretrain),
supervised cross-entropy, weight decay, loss / num_replicas (gradients are
summed across replicas by the optimizer), gradients, update. The loop runs
`num_steps` replica steps inside one `tf.function` and returns the mean of
each metric over them, averaged over replicas.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from simclr_tf import losses, schedules
from simclr_tf.config import Config
from simclr_tf.training import grad_cache

# TensorBoard names of the training metrics (SPEC.md §7), without "train/".
CONTRASTIVE_METRICS = ("contrast_loss", "contrast_acc", "contrast_entropy")
SUPERVISED_METRICS = ("supervised_loss", "supervised_acc")


def metric_names(config: Config, has_supervised_head: bool) -> list[str]:
    """The metrics a step returns, in a fixed order."""
    names = []
    if config.train.train_mode == "pretrain":
        names += CONTRASTIVE_METRICS
    if has_supervised_head:
        names += SUPERVISED_METRICS
    return names + ["weight_decay", "total_loss"]


def compute_losses(
    outputs: dict[str, tf.Tensor],
    labels: tf.Tensor,
    model: keras.Model,
    config: Config,
    replica_context: tf.distribute.ReplicaContext,
) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """The total loss of one replica and its parts (not yet / replicas).

    Args:
      outputs: the model's output dict for the local batch.
      labels: (n, num_classes) one-hot labels of the local batch.
      model: the SimCLR model (for the weight-decay term).
      config: the run config.
      replica_context: the replica context, for cross-replica negatives.

    Returns:
      (total loss, {metric name: scalar}).
    """
    metrics = {}
    total = tf.constant(0.0)
    sup_labels = labels
    if config.train.train_mode == "pretrain":
        loss, logits_ab, con_labels = losses.nt_xent_loss(
            outputs["proj_head_output"],
            temperature=config.loss.temperature,
            hidden_norm=config.loss.hidden_norm,
            replica_context=replica_context,
        )
        acc, entropy = losses.contrastive_metrics(logits_ab, con_labels)
        metrics.update(
            contrast_loss=loss, contrast_acc=acc, contrast_entropy=entropy
        )
        total += loss
        # The linear head sees both views: (2n, classes) labels.
        sup_labels = tf.concat([labels] * model.num_views, axis=0)
    if "logits_sup" in outputs:
        logits = outputs["logits_sup"]
        sup_loss = losses.supervised_loss(sup_labels, logits)
        correct = tf.equal(
            tf.argmax(sup_labels, axis=1), tf.argmax(logits, axis=1)
        )
        metrics.update(
            supervised_loss=sup_loss,
            supervised_acc=tf.reduce_mean(tf.cast(correct, tf.float32)),
        )
        total += sup_loss
    decay = schedules.weight_decay_loss(model, config.optim)
    total += decay
    metrics.update(weight_decay=decay, total_loss=total)
    return total, metrics


def make_replica_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    config: Config,
) -> Callable:
    """Returns `step(images, labels) -> metrics` for `strategy.run`."""
    variables = model.trainable_variables
    chunk = config.train.grad_cache_chunk_size
    # The outputs the loss reads: the only ones grad caching keeps whole.
    output_keys = (
        ["proj_head_output"] if config.train.train_mode == "pretrain" else []
    )
    if model.supervised_head is not None:
        output_keys.append("logits_sup")

    def step(images, labels):
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync

        def loss_fn(outputs):
            return compute_losses(outputs, labels, model, config, ctx)

        loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        if chunk:
            # Batch-norm statistics are then per chunk of `chunk` images.
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
