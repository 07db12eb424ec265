"""Tests of scripts/benchmark.py's pieces (not of any timing)."""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf.models import factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # For its dataclasses.
    spec.loader.exec_module(module)
    return module


benchmark = _load_script()


def test_count_graph_flops_tiny_conv_net():
    # 3x3 conv, 8x8x3 -> 8x8x4 ('same', no bias), global sum, dense 4 -> 5.
    conv = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)
    dense = keras.layers.Dense(5, use_bias=False)

    def fn(x):
        return dense(tf.reduce_mean(conv(x), axis=[1, 2]))

    fn(tf.zeros((2, 8, 8, 3)))  # Build.
    flops = benchmark.count_graph_flops(fn, tf.TensorSpec((2, 8, 8, 3)))
    # 2 FLOPs per multiply-add. Conv: 2 images x 8x8 outputs x 4 filters x
    # (3x3x3) taps; dense: 2 x 4 x 5. The mean over 2x8x8x4 elements:
    # 64 - 1 adds + 1 divide per output (TF profiler's reduction count).
    conv_flops = 2 * (2 * 8 * 8 * 4 * 3 * 3 * 3)
    dense_flops = 2 * (2 * 4 * 5)
    mean_flops = 2 * 4 * (8 * 8 - 1 + 1)
    assert flops == conv_flops + dense_flops + mean_flops


def _resnet18_cifar_macs(size: int) -> int:
    """Multiply-adds of the conv layers of a CIFAR-stem ResNet-18, one view."""
    macs = size * size * 9 * 3 * 64  # Stem: 3x3, 3 -> 64, stride 1.
    cin = 64
    for i, cout in enumerate((64, 128, 256, 512)):
        s = size // 2**i  # Groups 2-4 halve the side in their first block.
        for block in range(2):
            macs += s * s * 9 * cin * cout  # conv1
            macs += s * s * 9 * cout * cout  # conv2
            if block == 0 and cin != cout:
                macs += s * s * cin * cout  # 1x1 projection shortcut
            cin = cout
    return macs


def test_resnet18_forward_flops_match_the_conv_count():
    config = config_lib.from_flat(dict(resnet_depth=18, image_size=32))
    keras.mixed_precision.set_global_policy("float32")
    model = factory.build_model(config, num_classes=10)
    flops = benchmark.count_graph_flops(
        lambda x: model(x, training=False), tf.TensorSpec((1, 32, 32, 6))
    )
    convs = 2 * 2 * _resnet18_cifar_macs(32)  # 2 views, 2 FLOPs per MAC.
    # About 1.11 GFLOPs of conv per view (FACTS.md: 1.12 GFLOPs forward);
    # heads, bias and residual adds are the rest, about 1%.
    assert convs == pytest.approx(2 * 1.112e9, rel=2e-3)
    assert convs <= flops <= 1.02 * convs


def test_matmul_flops_per_s_is_a_plausible_rate():
    rate = benchmark.matmul_flops_per_s(n=256, seconds=0.2)
    # Between 0.1 GFLOP/s (far slower than any CPU) and 100 TFLOP/s.
    assert 1e8 < rate < 1e14


def test_format_table_rows():
    row = dict(
        config="bf16",
        images_per_s=88.04,
        first_step_s=12.31,
        launch_to_first_step_s=19.04,
        peak_rss_gib=2.345,
        tensor_peak_gib=1.234,
        train_gflops_per_image=6.73,
        achieved_gflops_per_s=592.4,
        matmul_gflops_per_s=470.2,
        fraction_of_matmul=1.26,
        load_avg_1min_start_end=[1.04, 2.5],
    )
    lines = benchmark.format_table([row]).splitlines()
    assert lines[0].startswith(
        "| config | images/s | first step s | launch to 1st step s |"
    )
    assert lines[2] == (
        "| bf16 | 88.0 | 12.3 | 19.0 | 2.35 | 1.23 | 6.73 | 592 | 470 | 126% "
        "| 1.0-2.5 |"
    )


def test_top_ops_sums_executor_events_by_op_type(tmp_path):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    names = {
        1: "net/conv/Conv2D:Conv2D",
        2: "net/add:AddV2",
        3: "net/conv_1/Conv2D:Conv2D",
        4: "ExecutorState::Process",
    }
    for i, name in names.items():
        plane.event_metadata[i].id = i
        plane.event_metadata[i].name = name
    # (metadata id, duration in ms) on two executor threads; the python
    # thread's and non-op events are not counted.
    for line_name, events in (
        ("tf_Compute/1", [(1, 30), (2, 10), (4, 500)]),
        ("tf_Compute/2", [(3, 50), (2, 10)]),
        ("python", [(1, 1000)]),
    ):
        line = plane.lines.add(name=line_name)
        for metadata_id, ms in events:
            line.events.add(metadata_id=metadata_id, duration_ps=ms * 10**9)
    path = tmp_path / "plugins" / "profile" / "run" / "host.xplane.pb"
    path.parent.mkdir(parents=True)
    path.write_bytes(space.SerializeToString())
    # Two steps: Conv2D 80 ms -> 40 per step, 80 %; AddV2 20 -> 10, 20 %.
    assert benchmark.top_ops(str(tmp_path), steps=2) == [
        dict(op="Conv2D", ms_per_step=40.0, share=0.8),
        dict(op="AddV2", ms_per_step=10.0, share=0.2),
    ]
    # k=1: the rest is summed as "other".
    assert benchmark.top_ops(str(tmp_path), steps=2, k=1)[1] == dict(
        op="other", ms_per_step=10.0, share=0.2
    )


def test_fixed_batch_mode_repeats_the_pipelines_first_batch():
    # --input_pipeline=off feeds the real pipeline's first batch forever.
    settings = benchmark.Settings(
        batch_size=4,
        depth=18,
        width_multiplier=1,
        image_size=16,
        replicas=0,
        steps=1,
        warmup_steps=0,
        steps_per_loop=1,
        num_images=8,
        profile_steps=0,
        matmul_seconds=0.1,
        matmul_n=256,
    )
    config = benchmark.benchmark_config(benchmark.PRESETS["float32"], settings)
    assert config.data.image_size == 16 and config.train.train_batch_size == 4
    source = benchmark.random_image_source(8, 16)
    assert source.info.num_train_examples == 8 and source.info.num_classes == 10
    strategy = tf.distribute.OneDeviceStrategy("/CPU:0")

    def batches(pipeline, n):
        ds = benchmark.training_dataset(config, strategy, source, 2, pipeline)
        iterator = iter(ds)
        return [next(iterator) for _ in range(n)]

    streamed = batches(True, 2)
    fixed = batches(False, 3)
    assert streamed[0][0].shape == (4, 16, 16, 6)
    assert not np.array_equal(streamed[0][0], streamed[1][0])
    for images, labels in fixed:
        np.testing.assert_array_equal(images, streamed[0][0])
        np.testing.assert_array_equal(labels, streamed[0][1])


@pytest.mark.slow
def test_two_step_run_prints_json_and_table(tmp_path):
    out = tmp_path / "results.json"
    args = [
        sys.executable,
        SCRIPT,
        "--configs=float32",
        "--batch_size=4",
        "--image_size=16",
        "--steps=2",
        "--warmup_steps=0",
        "--num_images=8",
        "--matmul_n=256",
        "--matmul_seconds=0.1",
        f"--json_out={out}",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        args, capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = json.loads(out.read_text())
    assert result["config"] == "float32" and result["batch"] == 4
    assert len(result["images_per_s_samples"]) == 2
    assert result["images_per_s"] > 0 and result["first_step_s"] > 0
    # Launch to the end of the first step holds the first step.
    assert result["launch_to_first_step_s"] >= result["first_step_s"]
    # One view at 16x16 is a quarter of the convs at 32x32.
    convs = 2 * 2 * _resnet18_cifar_macs(16)
    assert convs <= result["forward_gflops_per_image"] * 1e9 <= 1.02 * convs
    assert result["train_gflops_per_image"] == pytest.approx(
        3 * result["forward_gflops_per_image"], rel=1e-3
    )
    assert "| float32 |" in proc.stdout
    # The profiled steps (--profile_steps, default 2) found the convolution
    # ops of the step; shares are of the summed op time.
    ops = {o["op"]: o for o in result["top_ops"]}
    assert any("Conv2D" in op for op in ops), ops
    assert sum(o["share"] for o in ops.values()) == pytest.approx(1, abs=0.01)
    assert all(o["ms_per_step"] >= 0 for o in ops.values())
    assert "Op time per step, float32" in proc.stdout
