"""Shared test set-up: 2 logical CPU devices.

The CPU is split into 2 logical devices before TensorFlow initialises, so
that `tf.distribute.MirroredStrategy` tests can run 2 replicas on one CPU.
Single-device code keeps using /CPU:0.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 2

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
)
