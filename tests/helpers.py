"""Helpers shared by several test modules."""

import functools
import pathlib

import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf import cli, experiment, optim
from simclr_tf import config as config_lib
from tests.conftest import NUM_LOGICAL_CPUS

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE = ROOT / "flags" / "smoke.cfg"


@functools.cache
def two_replica_strategy() -> tf.distribute.MirroredStrategy:
    """A MirroredStrategy over the 2 logical CPU devices of conftest.

    One per process: in TF 2.21 a second MirroredStrategy over the same
    devices reuses collective keys and aborts ("Shape mismatch in the
    collective instance").
    """
    devices = [f"/CPU:{i}" for i in range(NUM_LOGICAL_CPUS)]
    return tf.distribute.MirroredStrategy(devices)


def smoke_config(model_dir, **overrides) -> config_lib.Config:
    """The smoke recipe's config with overrides, without global flags."""
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["run.py", f"--flagfile={SMOKE}", f"--model_dir={model_dir}"])
    flat = config_lib.to_flat(cli.config_from_flags())
    cli.FLAGS.unparse_flags()
    flat.update(overrides)
    return config_lib.from_flat(flat)


def run_on_mock_data(config: config_lib.Config, num_examples: int = 48):
    """`experiment.run(config)` on TFDS mock data of `num_examples`."""
    with tfds.testing.mock_data(num_examples=num_examples):
        return experiment.run(config)


def build_optimizer(config: config_lib.Config, model, learning_rate=0.5):
    """The run's optimizer kind at a fixed learning rate, built on
    `model`'s variables (call inside the strategy scope)."""
    optimizer = optim.build_optimizer(
        config.optim.optimizer,
        learning_rate,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
        lars_exclusions=model.weight_groups.lars_exclusions,
    )
    optimizer.build(model.trainable_variables)
    return optimizer


def parse_run_py(flagfile, *args) -> config_lib.Config:
    """The config run.py builds from `--flagfile=flagfile` plus `args`."""
    cli.FLAGS.unparse_flags()
    try:
        cli.FLAGS(["run.py", f"--flagfile={flagfile}", *args])
        return cli.config_from_flags()
    finally:
        cli.FLAGS.unparse_flags()


def distributed_losses(strategy, replica_step, images, labels, steps=1):
    """Runs `replica_step` `steps` times on one global batch split evenly
    over the replicas; returns the replica-mean total loss of each step."""
    per = images.shape[0] // strategy.num_replicas_in_sync

    def shard(ctx):
        i = ctx.replica_id_in_sync_group
        return images[i * per : (i + 1) * per], labels[i * per : (i + 1) * per]

    batch = strategy.experimental_distribute_values_from_function(shard)

    @tf.function
    def run(batch):
        metrics = strategy.run(replica_step, args=batch)
        return strategy.reduce(
            tf.distribute.ReduceOp.MEAN, metrics["total_loss"], axis=None
        )

    return [float(run(batch)) for _ in range(steps)]
