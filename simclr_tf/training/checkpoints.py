"""Checkpoints: saving, restore precedence, compatibility, preemption.

Restore precedence (SPEC.md §7): the latest checkpoint in `model_dir`
(model, optimizer and step: a resumed run continues to the same total
steps); otherwise `--checkpoint` (weights only, the optimizer starts fresh;
with `zero_init_logits_layer` the supervised head is not restored).
`--checkpoint` may also be a checkpoint or SavedModel of the reference TF2
code (`simclr_tf.interop`).
"""

from __future__ import annotations

import json
import os
import signal

import keras
import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib
from simclr_tf import interop
from simclr_tf.models.factory import ARCHITECTURE_FIELDS


class CheckpointError(config_lib.ConfigError):
    """`--checkpoint` is missing or does not fit the model."""


def architecture_differences(
    theirs: dict, config: config_lib.Config, where: str
) -> list[str]:
    """The architecture fields (and the stem) where another run's config
    differs from `config`.

    Args:
      theirs: the other run's `config.json` (flag name -> value).
      config: this run's config.
      where: how messages name the other run, e.g. "in the checkpoint".

    Returns:
      One "name=theirs {where} vs ours here" per difference.
    """
    ours = config_lib.to_flat(config)
    diffs = [
        f"{name}={theirs[name]!r} {where} vs {ours[name]!r} here"
        for name in ARCHITECTURE_FIELDS
        if name in theirs and theirs[name] != ours[name]
    ]
    size = config.data.image_size
    their_size = theirs.get("image_size", size)
    if config_lib.use_cifar_stem(their_size) != config_lib.use_cifar_stem(size):
        diffs.append(
            f"image_size={their_size} {where} vs {size} here (a different stem)"
        )
    return diffs


def check_compatible(config: config_lib.Config, checkpoint_path: str) -> None:
    """Compares the architecture with the source run's `config.json`.

    Raises:
      CheckpointError: naming each field whose value differs.
    """
    source = os.path.join(os.path.dirname(checkpoint_path), "config.json")
    if not tf.io.gfile.exists(source):
        return
    with tf.io.gfile.GFile(source) as f:
        theirs = json.load(f)
    diffs = architecture_differences(theirs, config, "in the checkpoint")
    if diffs:
        raise CheckpointError(
            f"Checkpoint {checkpoint_path} does not fit this model: "
            + "; ".join(diffs)
            + ". Use the same flags as the run that wrote it, or another "
            "--checkpoint."
        )


def _restore_parts(parts: dict, path: str) -> None:
    try:
        status = tf.train.Checkpoint(
            model=tf.train.Checkpoint(**parts)
        ).restore(path)
        status.expect_partial()
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        first_line = str(e).strip().splitlines()[0][:300]
        raise CheckpointError(
            f"Checkpoint {path} does not fit this model ({', '.join(parts)}"
            f"): {first_line}"
        ) from e


def _detect(path: str) -> interop.Source:
    try:
        return interop.detect(path)
    except interop.SourceError as e:
        raise CheckpointError(str(e)) from e


def check_initial_checkpoint(
    config: config_lib.Config, num_classes: int | None
) -> None:
    """Checks `--checkpoint` against the run before anything is written.

    Args:
      config: the run config.
      num_classes: classes of the run's dataset (None: no labels).

    Raises:
      CheckpointError: a missing, unreadable or incompatible checkpoint,
        naming each mismatch.
    """
    source = _detect(config.train.checkpoint)
    if source.kind == interop.OURS:
        check_compatible(config, source.prefix)
        return
    try:
        interop.check_config(config, source, num_classes)
    except interop.SourceError as e:
        raise CheckpointError(str(e)) from e


def restore_initial_weights(
    model: keras.Model, config: config_lib.Config
) -> None:
    """Initialises `model` from `--checkpoint` (weights only).

    Raises:
      CheckpointError: a missing or incompatible checkpoint.
    """
    source = _detect(config.train.checkpoint)
    if source.kind != interop.OURS:
        head = model.supervised_head
        try:
            num_classes = head.num_classes if head is not None else None
            # `restore` reads every tensor before assigning any.
            interop.check_config(config, source, num_classes, False)
            interop.restore(model, config, source)
        except interop.SourceError as e:
            raise CheckpointError(str(e)) from e
        return
    path = source.prefix
    check_compatible(config, path)
    parts = {"encoder": model.encoder, "projection_head": model.projection_head}
    _restore_parts(parts, path)
    skipped = []
    head = model.supervised_head
    if head is not None:
        if config.model.zero_init_logits_layer:
            skipped.append("supervised head (zero_init_logits_layer)")
        else:
            try:
                _restore_parts({"supervised_head": head}, path)
            except CheckpointError as e:
                skipped.append(f"supervised head ({e})")
    logging.info("Initialised encoder and projection head from %s.", path)
    for part in skipped:
        logging.warning("Not restored from %s: %s.", path, part)


class Checkpointer:
    """Saves and restores model + optimizer (+ step) in `model_dir`.

    Non-chief workers of a multi-worker run save into a scratch directory
    (saving is a collective operation), which is removed afterwards.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        model_dir: str,
        max_to_keep: int,
        chief: bool = True,
    ):
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self._scratch = None if chief else os.path.join(model_dir, "_worker")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            self._scratch or model_dir,
            max_to_keep=max_to_keep,
        )

    def restore_latest(self) -> str | None:
        """Restores the latest checkpoint of model_dir; returns its path."""
        latest = self.manager.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            logging.info("Resumed from %s.", latest)
        return latest

    def save(self, step: int) -> str:
        path = self.manager.save(checkpoint_number=step)
        if self._scratch:
            tf.io.gfile.rmtree(self._scratch)
        else:
            logging.info("Saved checkpoint %s.", path)
        return path


class PreemptionWatcher:
    """Turns SIGTERM into a flag the host loop checks between loops, so the
    loop can save a checkpoint at the current step before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: checkpointing, then exiting.")
        self.requested = True

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
