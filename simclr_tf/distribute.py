"""Chooses and builds the `tf.distribute` strategy for a run.

TPU when asked (`--use_tpu`), several workers when `TF_CONFIG` names them,
all local GPUs when there are any, otherwise the CPU. `--cpu_replicas=N`
(for tests) splits the CPU into N logical devices and mirrors over them.
Also resolves `--mixed_precision=auto` for the hardware the strategy runs
on.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf
from absl import logging

from simclr_tf import devices
from simclr_tf.config import ConfigError, RuntimeConfig


def num_workers_in_tf_config() -> int:
    """Number of worker/chief tasks `TF_CONFIG` names (0 when unset)."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get(
            "cluster", {}
        )
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON: {e}.") from e
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def _split_cpu(num_devices: int) -> list[str]:
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu) or []
    if len(current) != num_devices:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
            )
        except RuntimeError as e:
            raise ConfigError(
                f"Received: cpu_replicas={num_devices}, but TensorFlow has "
                "already initialised its devices; set it before any "
                "TensorFlow op runs."
            ) from e
    return [f"/CPU:{i}" for i in range(num_devices)]


def _tpu_strategy(runtime: RuntimeConfig) -> tf.distribute.Strategy:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=runtime.tpu_name or runtime.master,
        zone=runtime.tpu_zone,
        project=runtime.gcp_project,
    )
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _set_inter_op_threads(threads: int) -> None:
    """Sizes TensorFlow's inter-op pool (0: leave TensorFlow's default)."""
    if not threads:
        return
    if tf.config.threading.get_inter_op_parallelism_threads() == threads:
        return
    try:
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as e:
        raise ConfigError(
            f"Received: inter_op_threads={threads}, but TensorFlow has "
            "already started in this process; set it before any "
            "TensorFlow op runs."
        ) from e


def build_strategy(runtime: RuntimeConfig) -> tf.distribute.Strategy:
    """Returns the strategy the hardware and flags call for.

    Raises:
      ConfigError: unusable TF_CONFIG, cpu_replicas or inter_op_threads.
    """
    devices.initialize_devices()  # Without the CPU-only cuInit error.
    _set_inter_op_threads(runtime.inter_op_threads)
    if runtime.use_tpu:
        strategy = _tpu_strategy(runtime)
    elif num_workers_in_tf_config() > 1:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif runtime.cpu_replicas:
        strategy = tf.distribute.MirroredStrategy(
            _split_cpu(runtime.cpu_replicas)
        )
    elif tf.config.list_physical_devices("GPU"):
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.OneDeviceStrategy("/CPU:0")
    # The public name: MultiWorkerMirroredStrategy is an alias of the
    # class CollectiveAllReduceStrategy.
    name = (
        "MultiWorkerMirroredStrategy"
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        else type(strategy).__name__
    )
    logging.info(
        "Strategy %s with %d replica(s).",
        name,
        strategy.num_replicas_in_sync,
    )
    return strategy


def check_batch_divisible(
    name: str, global_batch: int, strategy: tf.distribute.Strategy
) -> int:
    """Returns the per-replica batch, or raises if it would not be whole.

    Raises:
      ConfigError: `global_batch` is not a multiple of the replica count.
    """
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise ConfigError(
            f"Received: {name}={global_batch}, which does not divide by the "
            f"{replicas} replicas. Use a multiple of {replicas}."
        )
    return global_batch // replicas


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one worker that writes summaries, results and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (
        task_type == "worker"
        and task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


# /proc/cpuinfo flags of CPUs with bfloat16 dot-product instructions.
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bfloat16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bfloat16 products natively (AVX512-BF16 or
    AMX-BF16), from the first `flags` line of `cpuinfo_path` (Linux).
    False where that file cannot be read."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    cpu_flags = set(line.partition(":")[2].split())
                    return bool(cpu_flags & _BF16_CPU_FLAGS)
    except OSError:
        pass
    return False


def resolve_mixed_precision(
    requested: str, strategy: tf.distribute.Strategy
) -> str:
    """The compute precision a run uses: `requested`, or for "auto",
    "bfloat16" when every replica is a CPU of this machine and the CPU has
    native bfloat16 (faster, same loss curves within seed noise: README,
    Performance), else "none" (float32).
    Accelerators and several workers (whose CPUs this process cannot see)
    get float32 under "auto": ask for bfloat16 explicitly there."""
    if requested != "auto":
        return requested
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "none"
    devices = strategy.extended.worker_devices
    on_cpu = all(
        tf.DeviceSpec.from_string(d).device_type == "CPU" for d in devices
    )
    return "bfloat16" if on_cpu and cpu_has_native_bfloat16() else "none"
