"""Tests of simclr_tf.distribute: strategy choice and batch checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from simclr_tf import distribute
from simclr_tf.config import ConfigError, RuntimeConfig
from tests.helpers import two_replica_strategy

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_default_is_one_replica(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = distribute.build_strategy(RuntimeConfig())
    assert strategy.num_replicas_in_sync == 1
    assert distribute.is_chief(strategy)


def test_cpu_replicas_mirror_over_logical_devices(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    # conftest already split the CPU into 2 logical devices.
    strategy = distribute.build_strategy(RuntimeConfig(cpu_replicas=2))
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 2


def test_cpu_replicas_after_initialisation_is_a_clear_error():
    with pytest.raises(ConfigError, match="cpu_replicas=3"):
        distribute.build_strategy(RuntimeConfig(cpu_replicas=3))


def test_inter_op_threads_after_initialisation_is_a_clear_error():
    with pytest.raises(ConfigError, match="inter_op_threads=3"):
        distribute.build_strategy(RuntimeConfig(inter_op_threads=3))


@pytest.mark.parametrize(
    "flags,threads",
    [("", 0), ("inter_op_threads=1", 1), ("inter_op_threads=3", 3)],
)
def test_inter_op_threads_in_a_fresh_process(flags, threads):
    code = (
        "import tensorflow as tf\n"
        "from simclr_tf import config, distribute\n"
        f"runtime = config.RuntimeConfig({flags})\n"
        "distribute.build_strategy(runtime)\n"
        "print(tf.config.threading.get_inter_op_parallelism_threads())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TF_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == threads


def test_batch_must_divide_by_replicas():
    strategy = two_replica_strategy()
    assert (
        distribute.check_batch_divisible("train_batch_size", 8, strategy) == 4
    )
    with pytest.raises(ConfigError, match="train_batch_size=7.*2 replicas"):
        distribute.check_batch_divisible("train_batch_size", 7, strategy)


def test_tf_config_worker_count(monkeypatch):
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"], "chief": ["c:3"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster}))
    assert distribute.num_workers_in_tf_config() == 3
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribute.num_workers_in_tf_config()


@pytest.mark.parametrize(
    "flags_line, expected",
    [
        ("flags\t\t: fpu sse2 avx512f avx512_bf16 fma\n", True),
        ("flags\t\t: fpu amx_tile amx_bf16\n", True),
        ("flags\t\t: fpu sse2 avx512f avx512bw fma\n", False),
    ],
)
def test_cpu_has_native_bfloat16_reads_the_flags(
    tmp_path, flags_line, expected
):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\n" + flags_line)
    assert distribute.cpu_has_native_bfloat16(str(cpuinfo)) is expected


def test_cpu_has_native_bfloat16_without_cpuinfo(tmp_path):
    assert not distribute.cpu_has_native_bfloat16(str(tmp_path / "absent"))


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bfloat16_only_on_a_native_bf16_cpu(
    monkeypatch, native
):
    monkeypatch.setattr(distribute, "cpu_has_native_bfloat16", lambda: native)
    one_cpu = tf.distribute.OneDeviceStrategy("/CPU:0")
    expected = "bfloat16" if native else "none"
    assert distribute.resolve_mixed_precision("auto", one_cpu) == expected
    assert (
        distribute.resolve_mixed_precision("auto", two_replica_strategy())
        == expected
    )
    # An explicit choice is kept whatever the CPU.
    for requested in ("none", "bfloat16", "float16"):
        assert distribute.resolve_mixed_precision(requested, one_cpu) == (
            requested
        )


def test_auto_precision_is_float32_off_the_cpu(monkeypatch):
    monkeypatch.setattr(distribute, "cpu_has_native_bfloat16", lambda: True)

    class FakeExtended:
        worker_devices = ("/job:localhost/replica:0/task:0/device:GPU:0",)

    class FakeGpuStrategy:
        extended = FakeExtended()

    assert distribute.resolve_mixed_precision("auto", FakeGpuStrategy()) == (
        "none"
    )
