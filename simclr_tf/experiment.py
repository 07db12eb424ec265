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
from simclr_tf import distribute, evaluation, export, health, optim, preflight
from simclr_tf import run_info as run_info_lib
from simclr_tf import teacher as teacher_lib
from simclr_tf.data import input_pipeline, sources
from simclr_tf.models import factory
from simclr_tf.training import checkpoints, trainer

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
    preflight.check_labels_for_finetune(config, info)
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


def check_initial_checkpoint(
    config: config_lib.Config, info: sources.DatasetInfo | None = None
) -> None:
    """Fails before anything is written to model_dir when `--checkpoint`
    cannot initialise this run (it is not used when model_dir already
    holds a checkpoint to resume from).

    Args:
      config: the run config.
      info: the opened source's info; None opens the source for its class
        count (only when there is a checkpoint to check), without the label
        fraction, whose subset would cost a pass over a TFDS split.

    Raises:
      CheckpointError: see `checkpoints.check_initial_checkpoint`.
    """
    model_dir = config.train.model_dir
    if not config.train.checkpoint or (
        model_dir and tf.train.latest_checkpoint(model_dir)
    ):
        return
    if info is None:
        data = dataclasses.replace(config.data, label_fraction=1.0)
        info = sources.open_source(data).info
    checkpoints.check_initial_checkpoint(config, info.num_classes)


def _export(config, model, info, step, chief) -> None:
    """The SavedModel of `step` (`export.export_run`), on the chief.

    Written, as in the reference, after each evaluation (in mode=eval one
    per evaluated checkpoint) and, here also, at the end of training;
    `--keep_hub_module_max=-1` turns it off.
    """
    if chief and config.train.keep_hub_module_max >= 0:
        export.export_run(config, model, info, step)


def check_teacher(config: config_lib.Config, info: sources.DatasetInfo) -> None:
    """Fails before anything is written to model_dir when `--teacher`
    cannot teach this run: missing, unreadable, without a supervised head,
    or with classes other than the dataset's (a labelled one).

    Raises:
      ConfigError: one line naming the problem and its fix.
    """
    if config.train.train_mode != "distill":
        return
    if config.train.distill_alpha < 1.0:
        info.require_labels(
            config.data.dataset,
            f"distill_alpha={config.train.distill_alpha}",
            "The labelled term needs labels: use --distill_alpha=1 or a "
            "labelled dataset.",
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
    """Evaluates, then (on the chief: `writer` given) writes the results
    and exports the evaluated model."""
    results = evaluation.evaluate(config, strategy, model, source, step)
    results.update(teacher_results or {})
    if writer is not None:
        evaluation.write_results(config, results, writer)
        _export(config, model, source.info, step, chief=True)
    return results


class NothingEvaluatedError(config_lib.ConfigError):
    """mode=eval found no checkpoint to evaluate before its timeout."""


def _eval_checkpoints(
    config, strategy, model, optimizer, source, writer, teacher_results
):
    """mode=eval: evaluates each new checkpoint until the last step's.

    Raises:
      NothingEvaluatedError: no checkpoint appeared within
        `--eval_timeout_secs`.
    """
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
    timeout = config.eval.eval_timeout_secs
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
    if tf.train.latest_checkpoint(model_dir) is None:
        logging.warning(
            "mode=eval: no checkpoint in %s yet. Waiting up to %d s "
            "(--eval_timeout_secs) for a training run writing to this "
            "model_dir to save one; Ctrl-C stops waiting.",
            model_dir,
            timeout,
        )
    evaluated = 0
    for path in tf.train.checkpoints_iterator(
        model_dir, min_interval_secs=1, timeout=timeout
    ):
        ckpt.restore(path).expect_partial()
        step = int(optimizer.iterations.numpy())
        _evaluate_and_record(
            config, strategy, model, source, step, writer, teacher_results
        )
        evaluated += 1
        if step >= total:
            return
        logging.info(
            "Evaluated step %d of %d; waiting up to %d s for the next "
            "checkpoint in %s (Ctrl-C stops).",
            step,
            total,
            timeout,
            model_dir,
        )
    if not evaluated:
        raise NothingEvaluatedError(
            f"mode=eval: no checkpoint appeared in {model_dir} within "
            f"{timeout} s (--eval_timeout_secs); nothing was evaluated. "
            "Point --model_dir at a training run's directory, evaluate a "
            "checkpoint with --checkpoint, or wait longer."
        )
    logging.warning(
        "No new checkpoint in %s for %d s; stopping before the last step (%d).",
        model_dir,
        timeout,
        total,
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


def _collapse_detector(config, strategy, model, objective):
    """The collapse warning for the objective's health monitors (None
    without them), with the shapes they are computed on: one replica's
    batch of `num_views` views."""
    if not getattr(objective, "monitor_names", ()):
        return None
    feature_dim = model.encoder.output_dim
    proj_dim = model.projection_head.hidden_dims(feature_dim)[-1]
    local_batch = config.train.train_batch_size // strategy.num_replicas_in_sync
    return health.CollapseDetector(
        proj_dim=proj_dim,
        rows=model.num_views * local_batch,
        feature_dim=feature_dim,
    )


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

    objective = factory.build_objective(
        config, model, teacher, labelled=source.info.labelled
    )
    ctx = trainer.TrainContext(
        strategy,
        model,
        optimizer,
        objective,
        ckpt,
        chief,
        writer,
        dataset_fn=dataset_fn,
        preview_fn=functools.partial(
            _preview_images, config, source, pretrain, model.num_views
        ),
        collapse_detector=_collapse_detector(
            config, strategy, model, objective
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


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What a run opens before it writes anything (`prepare`)."""

    strategy: tf.distribute.Strategy
    source: sources.Source


def prepare(config: config_lib.Config) -> RunSetup:
    """Builds the strategy, opens the data source once and makes every
    check that could refuse the run, writing nothing.

    `run.py` calls it before writing `flags.cfg`, so that a refused run
    leaves its model_dir as it was (`preflight`).

    Raises:
      ConfigError: a check failed (one line: the value and the fix).
    """
    logging.info("simclr_tf %s", simclr_tf.__version__)
    # First: a MultiWorkerMirroredStrategy must exist before any op runs.
    strategy = distribute.build_strategy(config.runtime)
    distribute.check_batch_divisible(
        "train_batch_size", config.train.train_batch_size, strategy
    )
    if config.data.seed is not None:
        keras.utils.set_random_seed(config.data.seed)
    # The data source is opened (a folder scanned, a TFDS builder made)
    # once here; everything after reads its info and records.
    source = sources.open_source(config.data)
    preflight.check_run(config, source)
    check_initial_checkpoint(config, source.info)
    check_teacher(config, source.info)
    return RunSetup(strategy, source)


def run(
    config: config_lib.Config, setup: RunSetup | None = None
) -> dict[str, float] | None:
    """Runs `config.train.mode`; returns the last eval results, if any.

    Args:
      config: the run config.
      setup: `prepare(config)`'s result; None prepares here.
    """
    setup = setup or prepare(config)
    strategy, source = setup.strategy, setup.source
    info = source.info
    teacher = None
    if config.train.train_mode == "distill":
        # Loaded once, float32, inside the strategy; not in checkpoints.
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
    if mode == "train_then_eval":  # Exports after the evaluation.
        return _evaluate_and_record(
            config, strategy, model, source, step, writer, teacher_results
        )
    _export(config, model, info, step, chief)
    return None
