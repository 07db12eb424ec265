"""Helpers shared by several test modules."""

import functools

import tensorflow as tf

from tests.conftest import NUM_LOGICAL_CPUS


@functools.cache
def two_replica_strategy() -> tf.distribute.MirroredStrategy:
    """A MirroredStrategy over the 2 logical CPU devices of conftest.

    One per process: in TF 2.21 a second MirroredStrategy over the same
    devices reuses collective keys and aborts ("Shape mismatch in the
    collective instance").
    """
    devices = [f"/CPU:{i}" for i in range(NUM_LOGICAL_CPUS)]
    return tf.distribute.MirroredStrategy(devices)
