"""Shared test set-up: 2 logical CPU devices, a float32 policy per test.

The CPU is split into 2 logical devices before TensorFlow initialises, so
that `tf.distribute.MirroredStrategy` tests can run 2 replicas on one CPU.
Single-device code keeps using /CPU:0.

`experiment.run` sets the global Keras dtype policy (bfloat16 under
`--mixed_precision=auto` on a CPU with native bfloat16); every test starts
from float32 so that a run in one test cannot change the layers another
builds.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 2

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
)


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
