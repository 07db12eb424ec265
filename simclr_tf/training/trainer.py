"""The host training loop: restore, loop, summaries, progress, checkpoints.

Each host iteration runs up to `steps_per_loop` steps in one `tf.function`
call (fewer when a checkpoint or the last step falls sooner), then checks
the loss is finite, writes TensorBoard scalars, prints one progress line
and saves a checkpoint when one is due or SIGTERM asked for it.
"""

from __future__ import annotations

import dataclasses
import math
import time

import keras
import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib
from simclr_tf.data import augment, input_pipeline
from simclr_tf.training import checkpoints
from simclr_tf.training import step as step_lib

# Exit status after a SIGTERM-triggered checkpoint (128 + SIGTERM).
PREEMPTED_EXIT_CODE = 143


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before saving it."""


@dataclasses.dataclass
class TrainContext:
    """What the loop needs beyond the config."""

    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    info: input_pipeline.DatasetInfo
    chief: bool
    writer: tf.summary.SummaryWriter | None


def _progress_line(step, total, images_per_s, metrics, eta_s) -> str:
    loss = metrics["total_loss"]
    parts = [f"step {step}/{total}", f"{images_per_s:.1f} images/s"]
    parts.append(f"loss {loss:.4f}")
    if "contrast_acc" in metrics:
        parts.append(f"contrast_acc {metrics['contrast_acc']:.3f}")
    if "supervised_acc" in metrics:
        parts.append(f"supervised_acc {metrics['supervised_acc']:.3f}")
    parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta_s))}")
    return "  ".join(parts)


def _write_summaries(ctx: TrainContext, step: int, metrics, lr) -> None:
    if ctx.writer is None:
        return
    with ctx.writer.as_default(step=step):
        for name, value in metrics.items():
            tf.summary.scalar(f"train/{name}", value)
        tf.summary.scalar("learning_rate", lr)


def _write_augmentation_summary(
    ctx: TrainContext, data: config_lib.DataConfig, pretrain: bool
) -> None:
    """Logs what the model sees: a grid of training views of 8 images.

    It reads its own small pipeline: a second iterator over the training
    dataset would advance its seeded reshuffling and change the stream.
    That pipeline does not cache: it reads only a shuffle buffer's worth,
    and a partly read cache is discarded with a warning.
    """
    if ctx.writer is None:
        return
    dataset = input_pipeline.build_dataset(
        dataclasses.replace(data, cache_dataset=False),
        batch_size=8,
        is_training=True,
        pretrain=pretrain,
    )
    images, _ = next(iter(dataset))
    with ctx.writer.as_default(step=0):
        tf.summary.image(
            "train/augmented_views", augment.augmentation_grid(images)
        )


def _current_lr(optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


def train(config: config_lib.Config, ctx: TrainContext) -> int:
    """Trains to the total number of steps; returns the final step.

    Raises:
      NonFiniteLossError: the loss became NaN or infinite.
      SystemExit: after saving a checkpoint on SIGTERM.
    """
    tc = config.train
    total = config_lib.total_train_steps(tc, ctx.info.num_train_examples)
    every = config_lib.checkpoint_every(tc, ctx.info.num_train_examples)
    ckpt = checkpoints.Checkpointer(
        ctx.model,
        ctx.optimizer,
        tc.model_dir,
        tc.keep_checkpoint_max,
        chief=ctx.chief,
    )
    if not ckpt.restore_latest() and tc.checkpoint:
        checkpoints.restore_initial_weights(ctx.model, config)
    step = int(ctx.optimizer.iterations.numpy())
    if step >= total:
        logging.info("Training is already finished (step %d/%d).", step, total)
        return step

    pretrain = tc.train_mode == "pretrain"
    dataset = input_pipeline.build_distributed_dataset(
        ctx.strategy,
        config.data,
        global_batch_size=tc.train_batch_size,
        is_training=True,
        pretrain=pretrain,
        # With a fixed seed, a resumed run replays the same stream.
        start_batch=step if config.data.seed is not None else 0,
    )
    if step == 0:
        _write_augmentation_summary(ctx, config.data, pretrain)
    iterator = iter(dataset)
    names = step_lib.metric_names(config, ctx.model.supervised_head is not None)
    loop = step_lib.make_train_loop(
        ctx.strategy,
        step_lib.make_replica_step(ctx.model, ctx.optimizer, config),
        names,
        jit_compile=config.runtime.jit_compile,
    )
    watcher = checkpoints.PreemptionWatcher()
    try:
        while step < total:
            n = min(tc.steps_per_loop, total - step, every - step % every)
            start = time.perf_counter()
            metrics = loop(iterator, tf.constant(n, tf.int32))
            metrics = {k: float(v) for k, v in metrics.items()}
            seconds = time.perf_counter() - start
            if not math.isfinite(metrics["total_loss"]):
                raise NonFiniteLossError(
                    f"Loss is {metrics['total_loss']} at step {step + n}; "
                    "stopped without saving. The last good checkpoint is "
                    f"{ckpt.manager.latest_checkpoint}. Lower "
                    "--learning_rate or check the input data."
                )
            step = int(ctx.optimizer.iterations.numpy())
            _write_summaries(ctx, step, metrics, _current_lr(ctx.optimizer))
            logging.info(
                _progress_line(
                    step,
                    total,
                    n * tc.train_batch_size / seconds,
                    metrics,
                    (total - step) * seconds / n,
                )
            )
            if step % every == 0 or step == total or watcher.requested:
                ckpt.save(step)
            if watcher.requested:
                raise SystemExit(PREEMPTED_EXIT_CODE)
    finally:
        watcher.close()
        if ctx.writer is not None:
            ctx.writer.flush()
    return step
