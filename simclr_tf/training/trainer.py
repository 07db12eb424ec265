"""The host training loop: summaries, progress, checkpoints over a plan.

Each host iteration runs up to `steps_per_loop` steps in one `tf.function`
call (fewer when a checkpoint or the last step falls sooner), then checks
the loss is finite, writes TensorBoard scalars (the metrics' means over
the call and the objective's health monitors of its last step), prints
one progress line, passes the monitors to the collapse detector and saves
a checkpoint when one is due or SIGTERM asked for it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from simclr_tf.data import augment
from simclr_tf.training import checkpoints
from simclr_tf.training import step as step_lib

# Exit status after a SIGTERM-triggered checkpoint (128 + SIGTERM).
PREEMPTED_EXIT_CODE = 143


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before saving it."""


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """The step arithmetic of a run, computed once by the experiment.

    Attributes:
      total_steps: the step training stops at (a resumed run too).
      checkpoint_every: steps between checkpoints.
      steps_per_loop: replica steps per `tf.function` call of the loop.
      global_batch_size: images per step over all replicas (for the
        images/s of the progress line).
      start_step: the optimizer's step after restoring (0 when fresh).
      start_batch: the first batch of the input stream to read (the
        resumed run of a seeded stream skips the consumed ones).
      jit_compile: XLA-compile the replica step.
      grad_cache_chunk_size: 0, or the images per gradient-caching chunk.
    """

    total_steps: int
    checkpoint_every: int
    steps_per_loop: int
    global_batch_size: int
    start_step: int = 0
    start_batch: int = 0
    jit_compile: bool = False
    grad_cache_chunk_size: int = 0


@dataclasses.dataclass
class TrainContext:
    """The objects the loop runs with, built by the experiment.

    Attributes:
      strategy: the distribution strategy.
      model: the built model, restored.
      optimizer: its optimizer, restored.
      objective: `objective(outputs, labels, replica_context)` with
        `output_keys` and `metric_names` (`simclr_tf.objective`).
      checkpointer: saves model + optimizer into the run's directory.
      chief: whether this worker writes summaries and logs.
      writer: the TensorBoard writer (None on non-chief workers).
      dataset_fn: `dataset_fn(start_batch)`, the distributed training
        stream from that batch on.
      preview_fn: returns a batch of training views for the augmentation
        summary of a fresh run (None: no summary).
      collapse_detector: called as `update(step, proj_std, rankme)` with
        each log's monitors (`simclr_tf.health.CollapseDetector`; None:
        no collapse warning).
    """

    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    objective: Callable
    checkpointer: checkpoints.Checkpointer
    chief: bool
    writer: tf.summary.SummaryWriter | None
    dataset_fn: Callable[[int], Iterable]
    preview_fn: Callable[[], tf.Tensor] | None = None
    collapse_detector: Any | None = None


def _progress_line(step, total, images_per_s, metrics, eta_s) -> str:
    loss = metrics["total_loss"]
    parts = [f"step {step}/{total}", f"{images_per_s:.1f} images/s"]
    parts.append(f"loss {loss:.4f}")
    if "contrast_acc" in metrics:
        parts.append(f"contrast_acc {metrics['contrast_acc']:.3f}")
    if "teacher_agreement" in metrics:
        parts.append(f"teacher_agreement {metrics['teacher_agreement']:.3f}")
    if "supervised_acc" in metrics:
        parts.append(f"supervised_acc {metrics['supervised_acc']:.3f}")
    if "proj_std" in metrics:
        parts.append(f"proj_std {metrics['proj_std']:.3f}")
    if "rankme" in metrics:
        parts.append(f"rankme {metrics['rankme']:.1f}")
    parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta_s))}")
    return "  ".join(parts)


def _write_summaries(ctx: TrainContext, step: int, metrics, lr) -> None:
    if ctx.writer is None:
        return
    with ctx.writer.as_default(step=step):
        for name, value in metrics.items():
            tf.summary.scalar(f"train/{name}", value)
        tf.summary.scalar("learning_rate", lr)


def _write_augmentation_summary(ctx: TrainContext) -> None:
    """Logs what the model sees: a grid of training views of 8 images."""
    if ctx.writer is None or ctx.preview_fn is None:
        return
    images = ctx.preview_fn()
    with ctx.writer.as_default(step=0):
        tf.summary.image(
            "train/augmented_views", augment.augmentation_grid(images)
        )


def _current_lr(optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


def train(plan: TrainPlan, ctx: TrainContext) -> int:
    """Trains from `plan.start_step` to `plan.total_steps`.

    Returns:
      The final step.

    Raises:
      NonFiniteLossError: the loss became NaN or infinite.
      SystemExit: after saving a checkpoint on SIGTERM.
    """
    total, every = plan.total_steps, plan.checkpoint_every
    step = plan.start_step
    if step >= total:
        logging.info("Training is already finished (step %d/%d).", step, total)
        return step
    dataset = ctx.dataset_fn(plan.start_batch)
    if step == 0:
        _write_augmentation_summary(ctx)
    iterator = iter(dataset)
    loop = step_lib.make_train_loop(
        ctx.strategy,
        step_lib.make_replica_step(
            ctx.model,
            ctx.optimizer,
            ctx.objective,
            grad_cache_chunk_size=plan.grad_cache_chunk_size,
        ),
        list(ctx.objective.metric_names),
        jit_compile=plan.jit_compile,
        monitor_names=getattr(ctx.objective, "monitor_names", ()),
    )
    ckpt = ctx.checkpointer
    watcher = checkpoints.PreemptionWatcher()
    try:
        while step < total:
            n = min(plan.steps_per_loop, total - step, every - step % every)
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
                    n * plan.global_batch_size / seconds,
                    metrics,
                    (total - step) * seconds / n,
                )
            )
            if ctx.collapse_detector is not None:
                ctx.collapse_detector.update(
                    step, metrics.get("proj_std"), metrics.get("rankme")
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
