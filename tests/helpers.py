"""Helpers shared by several test modules."""

import tensorflow as tf

from tests.conftest import NUM_LOGICAL_CPUS


def two_replica_strategy() -> tf.distribute.MirroredStrategy:
    """A MirroredStrategy over the 2 logical CPU devices of conftest."""
    devices = [f"/CPU:{i}" for i in range(NUM_LOGICAL_CPUS)]
    return tf.distribute.MirroredStrategy(devices)
