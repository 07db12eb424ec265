"""Runs one experiment: strategy, data source, model, then train / eval /
both.

This is where the run config stops: the model, its objective, optimizer
and train plan are built here from it, and the training core
(`simclr_tf.training`) receives only those values.
"""

from __future__ import annotations

import dataclasses
import functools

import keras
import tensorflow as tf
from absl import logging

import simclr_tf
from simclr_tf import config as config_lib
from simclr_tf import distribute, evaluation, export, optim
from simclr_tf import run_info as run_info_lib
from simclr_tf import teacher as teacher_lib
from simclr_tf.data import input_pipeline, sources
from simclr_tf.models import factory
from simclr_tf.training import checkpoints, trainer

# mode=eval stops waiting when no new checkpoint appears for this long.
EVAL_WAIT_SECONDS = 600

_POLICIES = {
    "none": "float32",
    "bfloat16": "mixed_bfloat16",
    "float16": "mixed_float16",
}


def total_steps(config: config_lib.Config, num_train_examples: int) -> int:
    """The step the run stops at (`optim.total_train_steps`)."""
    t = config.train
    return optim.total_train_steps(
        t.train_steps, t.train_epochs, num_train_examples, t.train_batch_size
    )


def train_plan(
    config: config_lib.Config, num_train_examples: int, start_step: int
) -> trainer.TrainPlan:
    """The run's step arithmetic, from a restored `start_step`."""
    t = config.train
    return trainer.TrainPlan(
        total_steps=total_steps(config, num_train_examples),
        checkpoint_every=optim.checkpoint_every(
            t.checkpoint_steps,
            t.checkpoint_epochs,
            num_train_examples,
            t.train_batch_size,
        ),
        steps_per_loop=t.steps_per_loop,
        global_batch_size=t.train_batch_size,
        start_step=start_step,
        # With a fixed seed, a resumed run replays the same stream.
        start_batch=start_step if config.data.seed is not None else 0,
        jit_compile=config.runtime.jit_compile,
        grad_cache_chunk_size=t.grad_cache_chunk_size,
    )


def build_model_and_optimizer(
    config: config_lib.Config,
    strategy: tf.distribute.Strategy,
    info: sources.DatasetInfo,
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
    policy = _POLICIES[
        distribute.resolve_mixed_precision(
            config.runtime.mixed_precision, strategy
        )
    ]
    logging.info(
        "Compute precision: %s (--mixed_precision=%s).",
        policy,
        config.runtime.mixed_precision,
    )
    o, batch = config.optim, config.train.train_batch_size
    n = info.num_train_examples
    with strategy.scope():
        model = factory.build_model(config, info.num_classes, policy)
        size = config.data.image_size
        model(tf.zeros((1, size, size, 3 * model.num_views)), training=False)
        schedule = optim.WarmUpAndCosine(
            optim.scaled_learning_rate(
                o.learning_rate, o.learning_rate_scaling, batch
            ),
            optim.warmup_steps(o.warmup_epochs, n, batch),
            total_steps(config, n),
        )
        optimizer = optim.build_optimizer(
            o.optimizer,
            schedule,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            lars_exclusions=model.weight_groups.lars_exclusions,
        )
        if policy == _POLICIES["float16"]:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def check_initial_checkpoint(config: config_lib.Config) -> None:
    """Fails before anything is written to model_dir when `--checkpoint`
    cannot initialise this run (it is not used when model_dir already
    holds a checkpoint to resume from).

    It opens the data source for its class count (a second opening, before
    `run` opens it; only when there is a checkpoint to check), without the
    label fraction, whose subset would cost a pass over a TFDS split.

    Raises:
      CheckpointError: see `checkpoints.check_initial_checkpoint`.
    """
    model_dir = config.train.model_dir
    if not config.train.checkpoint or (
        model_dir and tf.train.latest_checkpoint(model_dir)
    ):
        return
    data = dataclasses.replace(config.data, label_fraction=1.0)
    info = sources.open_source(data).info
    checkpoints.check_initial_checkpoint(config, info.num_classes)


def check_teacher(config: config_lib.Config) -> None:
    """Fails before anything is written to model_dir when `--teacher`
    cannot teach this run: missing, unreadable, without a supervised head,
    or with classes other than the dataset's (a labelled one). It opens
    the data source for its labels (a second opening, distillation only).

    Raises:
      ConfigError: one line naming the problem and its fix.
    """
    if config.train.train_mode != "distill":
        return
    info = sources.open_source(config.data).info
    if config.train.distill_alpha < 1.0 and not info.labelled:
        raise config_lib.ConfigError(
            f"Received: distill_alpha={config.train.distill_alpha} on "
            f"{config.data.dataset!r}, which has no labels. The labelled "
            "term needs labels: use --distill_alpha=1 or a labelled dataset."
        )
    teacher_lib.check(config.train.teacher, info.num_classes)


def _teacher_results(config, strategy, teacher, source) -> dict:
    """The teacher's top-1/top-5 on the eval split (labelled data only)."""
    if teacher is None or not source.info.labelled:
        return {}
    top1, top5 = evaluation.linear_accuracy(
        config, strategy, teacher.model, source
    )
    return {
        "eval/teacher_top_1_accuracy": top1,
        "eval/teacher_top_5_accuracy": top5,
    }


def _evaluate_and_record(
    config, strategy, model, source, step, writer, teacher_results=None
):
    results = evaluation.evaluate(config, strategy, model, source, step)
    results.update(teacher_results or {})
    if writer is not None:
        evaluation.write_results(config, results, writer)
    return results


def _eval_checkpoints(
    config, strategy, model, optimizer, source, writer, teacher_results
):
    """mode=eval: evaluates each new checkpoint until the last step's."""
    model_dir = config.train.model_dir
    total = total_steps(config, source.info.num_train_examples)
    if (
        tf.train.latest_checkpoint(model_dir) is None
        and config.train.checkpoint
    ):
        checkpoints.restore_initial_weights(model, config)
        _evaluate_and_record(
            config, strategy, model, source, 0, writer, teacher_results
        )
        return
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
    logging.info("Waiting for checkpoints in %s.", model_dir)
    for path in tf.train.checkpoints_iterator(
        model_dir, min_interval_secs=1, timeout=EVAL_WAIT_SECONDS
    ):
        ckpt.restore(path).expect_partial()
        step = int(optimizer.iterations.numpy())
        _evaluate_and_record(
            config, strategy, model, source, step, writer, teacher_results
        )
        if step >= total:
            return
    logging.warning(
        "No new checkpoint in %s for %d s; stopping.",
        model_dir,
        EVAL_WAIT_SECONDS,
    )


def _preview_images(
    config: config_lib.Config,
    source: sources.Source,
    pretrain: bool,
    num_views: int,
) -> tf.Tensor:
    """8 training examples' views for the augmentation summary.

    A small pipeline of its own: a second iterator over the training
    dataset would advance its seeded reshuffling and change the stream.
    It does not cache: it reads only a shuffle buffer's worth, and a
    partly read cache is discarded with a warning.
    """
    dataset = input_pipeline.build_dataset(
        source,
        dataclasses.replace(config.data, cache_dataset=False),
        batch_size=8,
        is_training=True,
        pretrain=pretrain,
        num_views=num_views,
        need_labels=False,  # Only the images are shown.
    )
    images, _ = next(iter(dataset))
    return images


def train(
    config: config_lib.Config,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    source: sources.Source,
    chief: bool = True,
    writer: tf.summary.SummaryWriter | None = None,
    teacher: teacher_lib.Teacher | None = None,
) -> int:
    """Restores (latest checkpoint, else `--checkpoint`), then trains on
    `source` (its training split, `model.num_views` views per image; when
    distilling, against `teacher`).

    Returns:
      The final step.
    """
    t = config.train
    ckpt = checkpoints.Checkpointer(
        model, optimizer, t.model_dir, t.keep_checkpoint_max, chief=chief
    )
    if not ckpt.restore_latest() and t.checkpoint:
        checkpoints.restore_initial_weights(model, config)
    plan = train_plan(
        config,
        source.info.num_train_examples,
        int(optimizer.iterations.numpy()),
    )
    pretrain = t.train_mode == "pretrain"

    def dataset_fn(start_batch: int):
        return input_pipeline.build_distributed_dataset(
            strategy,
            source,
            config.data,
            global_batch_size=t.train_batch_size,
            is_training=True,
            pretrain=pretrain,
            num_views=model.num_views,
            start_batch=start_batch,
            need_labels=t.train_mode == "finetune",
        )

    ctx = trainer.TrainContext(
        strategy,
        model,
        optimizer,
        factory.build_objective(
            config, model, teacher, labelled=source.info.labelled
        ),
        ckpt,
        chief,
        writer,
        dataset_fn=dataset_fn,
        preview_fn=functools.partial(
            _preview_images, config, source, pretrain, model.num_views
        ),
    )
    return trainer.train(plan, ctx)


def _write_run_info(config, info, model) -> None:
    run_info_lib.write(
        run_info_lib.RunInfo(
            num_classes=info.num_classes,
            class_names=info.class_names,
            num_train_examples=info.num_train_examples,
            num_eval_examples=info.num_eval_examples,
            dtype_policy=model.dtype_policy.name,
            total_steps=total_steps(config, info.num_train_examples),
        ),
        config.train.model_dir,
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
    # The data source is opened (a folder scanned, a TFDS builder made)
    # once here; everything below reads its info and records.
    source = sources.open_source(config.data)
    info = source.info
    teacher = None
    if config.train.train_mode == "distill":
        # Loaded once, float32, inside the strategy; not in checkpoints.
        teacher_lib.check(config.train.teacher, info.num_classes)
        teacher = teacher_lib.load(config.train.teacher, strategy)
        # The student's head has the teacher's classes.
        info = dataclasses.replace(
            info,
            num_classes=teacher.num_classes,
            class_names=teacher.class_names or info.class_names,
        )
    model, optimizer = build_model_and_optimizer(config, strategy, info)
    chief = distribute.is_chief(strategy)
    if chief:
        config_lib.write_json(config, config.train.model_dir)
        _write_run_info(config, info, model)
    writer = (
        tf.summary.create_file_writer(config.train.model_dir) if chief else None
    )
    mode = config.train.mode
    teacher_results = {}
    if mode != "train":
        teacher_results = _teacher_results(config, strategy, teacher, source)
    if mode == "eval":
        _eval_checkpoints(
            config, strategy, model, optimizer, source, writer, teacher_results
        )
        return None
    step = train(
        config,
        strategy,
        model,
        optimizer,
        source,
        chief=chief,
        writer=writer,
        teacher=teacher,
    )
    if chief and config.train.keep_hub_module_max:
        export.export_run(config, model, info, step)
    if mode == "train_then_eval":
        return _evaluate_and_record(
            config, strategy, model, source, step, writer, teacher_results
        )
    return None
