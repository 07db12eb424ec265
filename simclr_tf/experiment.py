"""Runs one experiment: strategy, data, model, then train / eval / both."""

from __future__ import annotations

import keras
import tensorflow as tf
from absl import logging

import simclr_tf
from simclr_tf import config as config_lib
from simclr_tf import distribute, evaluation, export, schedules
from simclr_tf.data import input_pipeline
from simclr_tf.models import factory
from simclr_tf.training import checkpoints, trainer

# mode=eval stops waiting when no new checkpoint appears for this long.
EVAL_WAIT_SECONDS = 600

_POLICIES = {
    "none": "float32",
    "bfloat16": "mixed_bfloat16",
    "float16": "mixed_float16",
}


def build_model_and_optimizer(
    config: config_lib.Config,
    strategy: tf.distribute.Strategy,
    info: input_pipeline.DatasetInfo,
) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    """Builds the model, its schedule and optimizer inside the strategy.

    The optimizer is built on the model's variables here, inside
    `strategy.scope()`: Keras 3 cannot create its slots inside the first
    distributed step (FACTS.md).
    """
    if config.train.train_mode == "finetune" and info.num_classes is None:
        raise config_lib.ConfigError(
            f"Received: train_mode=finetune on {config.data.dataset!r}, "
            "which has no labels. Fine-tune on a labelled dataset (class "
            "subfolders) or use --train_mode=pretrain."
        )
    precision = distribute.resolve_mixed_precision(
        config.runtime.mixed_precision, strategy
    )
    logging.info(
        "Compute precision: %s (--mixed_precision=%s).",
        _POLICIES[precision],
        config.runtime.mixed_precision,
    )
    keras.mixed_precision.set_global_policy(_POLICIES[precision])
    batch = config.train.train_batch_size
    total = config_lib.total_train_steps(config.train, info.num_train_examples)
    with strategy.scope():
        model = factory.build_model(config, info.num_classes)
        size = config.data.image_size
        model(tf.zeros((1, size, size, 3 * model.num_views)), training=False)
        schedule = schedules.build_schedule(
            config.optim, info.num_train_examples, batch, total
        )
        optimizer = schedules.build_optimizer(config.optim, schedule, model)
        if precision == "float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def check_initial_checkpoint(config: config_lib.Config) -> None:
    """Fails before anything is written to model_dir when `--checkpoint`
    cannot initialise this run (it is not used when model_dir already
    holds a checkpoint to resume from).

    Raises:
      CheckpointError: see `checkpoints.check_initial_checkpoint`.
    """
    model_dir = config.train.model_dir
    if not config.train.checkpoint or (
        model_dir and tf.train.latest_checkpoint(model_dir)
    ):
        return
    info = input_pipeline.get_dataset_info(config.data)
    checkpoints.check_initial_checkpoint(config, info.num_classes)


def _evaluate_and_record(config, strategy, model, info, step, writer):
    results = evaluation.evaluate(config, strategy, model, info, step)
    if writer is not None:
        evaluation.write_results(config, results, writer)
    return results


def _eval_checkpoints(config, ctx, total):
    """mode=eval: evaluates each new checkpoint until the last step's."""
    model_dir = config.train.model_dir
    if (
        tf.train.latest_checkpoint(model_dir) is None
        and config.train.checkpoint
    ):
        checkpoints.restore_initial_weights(ctx.model, config)
        _evaluate_and_record(
            config, ctx.strategy, ctx.model, ctx.info, 0, ctx.writer
        )
        return
    ckpt = tf.train.Checkpoint(model=ctx.model, optimizer=ctx.optimizer)
    logging.info("Waiting for checkpoints in %s.", model_dir)
    for path in tf.train.checkpoints_iterator(
        model_dir, min_interval_secs=1, timeout=EVAL_WAIT_SECONDS
    ):
        ckpt.restore(path).expect_partial()
        step = int(ctx.optimizer.iterations.numpy())
        _evaluate_and_record(
            config, ctx.strategy, ctx.model, ctx.info, step, ctx.writer
        )
        if step >= total:
            return
    logging.warning(
        "No new checkpoint in %s for %d s; stopping.",
        model_dir,
        EVAL_WAIT_SECONDS,
    )


def run(config: config_lib.Config) -> dict[str, float] | None:
    """Runs `config.train.mode`; returns the last eval results, if any."""
    logging.info("simclr_tf %s", simclr_tf.__version__)
    strategy = distribute.build_strategy(config.runtime)
    distribute.check_batch_divisible(
        "train_batch_size", config.train.train_batch_size, strategy
    )
    if config.data.seed is not None:
        keras.utils.set_random_seed(config.data.seed)
    info = input_pipeline.get_dataset_info(config.data)
    model, optimizer = build_model_and_optimizer(config, strategy, info)
    chief = distribute.is_chief(strategy)
    if chief:
        config_lib.write_json(config, config.train.model_dir)
    writer = (
        tf.summary.create_file_writer(config.train.model_dir) if chief else None
    )
    ctx = trainer.TrainContext(strategy, model, optimizer, info, chief, writer)
    total = config_lib.total_train_steps(config.train, info.num_train_examples)
    mode = config.train.mode
    if mode == "eval":
        _eval_checkpoints(config, ctx, total)
        return None
    step = trainer.train(config, ctx)
    if chief and config.train.keep_hub_module_max:
        export.export_run(config, model, info, step)
    if mode == "train_then_eval":
        return _evaluate_and_record(config, strategy, model, info, step, writer)
    return None
