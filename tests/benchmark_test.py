"""Tests of scripts/benchmark.py's and scripts/benchmark_measures.py's
pieces (not of any timing)."""

import collections
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
measures = benchmark.measures


def test_count_graph_flops_tiny_conv_net():
    # 3x3 conv, 8x8x3 -> 8x8x4 ('same', no bias), global sum, dense 4 -> 5.
    conv = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)
    dense = keras.layers.Dense(5, use_bias=False)

    def fn(x):
        return dense(tf.reduce_mean(conv(x), axis=[1, 2]))

    fn(tf.zeros((2, 8, 8, 3)))  # Build.
    flops, padding = measures.count_graph_flops(fn, tf.TensorSpec((2, 8, 8, 3)))
    # 2 FLOPs per multiply-add. Conv: 2 images x 8x8 outputs x 4 filters x
    # (3x3x3) taps; dense: 2 x 4 x 5. The mean over 2x8x8x4 elements:
    # 64 - 1 adds + 1 divide per output (TF profiler's reduction count).
    conv_flops = 2 * (2 * 8 * 8 * 4 * 3 * 3 * 3)
    dense_flops = 2 * (2 * 4 * 5)
    mean_flops = 2 * 4 * (8 * 8 - 1 + 1)
    assert flops == conv_flops + dense_flops + mean_flops
    # Along each axis 8 outputs x 3 taps = 24 pairs, of which the first
    # output's left tap and the last one's right tap read padding: 22.
    assert padding == 2 * 2 * (24 * 24 - 22 * 22) * 3 * 4


@pytest.mark.parametrize(
    "pad_with, stride, size, expected_pairs",
    [
        # 3x3 on 5x5, stride 2, (1, 1) zeros: outputs 0..2 read input rows
        # 2o-1..2o+1; row -1 (o=0) and row 5 (o=2) are padding: 9 - 2.
        ("tf.pad", 2, 5, 7),
        ("explicit", 2, 5, 7),
        # SAME, stride 2 on 6x6: 3 outputs, TF pads (0, 1): only o=2's
        # last tap (row 6) is padding.
        ("same", 2, 6, 8),
    ],
)
def test_conv_padding_flops_counts_the_products_with_zeros(
    pad_with, stride, size, expected_pairs
):
    kernel = tf.ones((3, 3, 2, 5))

    def fn(x):
        if pad_with == "tf.pad":
            x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
            return tf.nn.conv2d(x, kernel, stride, "VALID")
        if pad_with == "explicit":
            pads = [[0, 0], [1, 1], [1, 1], [0, 0]]
            return tf.nn.conv2d(x, kernel, stride, pads)
        return tf.nn.conv2d(x, kernel, stride, "SAME")

    _, padding = measures.count_graph_flops(
        fn, tf.TensorSpec((3, size, size, 2))
    )
    # 3 outputs x 3 taps = 9 pairs per axis; 3 images, 2 -> 5 channels.
    assert padding == 2 * 3 * (9 * 9 - expected_pairs**2) * 2 * 5


def test_a_valid_conv_of_real_data_has_no_padding_flops():
    kernel = tf.ones((3, 3, 2, 5))

    def fn(x):
        return tf.nn.conv2d(x, kernel, 1, "VALID")

    flops, padding = measures.count_graph_flops(fn, tf.TensorSpec((1, 6, 6, 2)))
    assert padding == 0 and flops == 2 * 4 * 4 * 9 * 2 * 5


def _resnet18_cifar_macs(size: int) -> int:
    """Multiply-adds of the conv layers of a CIFAR-stem ResNet-18, one view."""
    macs = size * size * 9 * 3 * 64  # Stem: 3x3, 3 -> 64, stride 1.
    cin = 64
    for i, cout in enumerate((64, 128, 256, 512)):
        s = size // 2**i  # Groups 2-4 halve the side in their first block.
        for block in range(2):
            macs += s * s * 9 * cin * cout  # conv1
            macs += s * s * 9 * cout * cout  # conv2
            if block == 0:  # The reference projects in every first block.
                macs += s * s * cin * cout  # 1x1 projection shortcut
            cin = cout
    return macs


def _resnet18_cifar_padding_macs(size: int) -> int:
    """Multiply-adds of the 3x3 convs of a CIFAR-stem ResNet-18 with their
    zero padding, one view. Per axis, a stride-1 conv on s positions (one
    zero each side) has 3s (output, tap) pairs, 2 on padding; the stride-2
    conv to s positions (tf.pad by one each side) 3s, 1 on padding (the
    first output's first tap)."""

    def stride_1(s, cin, cout):
        return (9 * s * s - (3 * s - 2) ** 2) * cin * cout

    macs = stride_1(size, 3, 64)  # Stem.
    cin = 64
    for i, cout in enumerate((64, 128, 256, 512)):
        s = size // 2**i
        if i == 0:
            macs += stride_1(s, cin, cout)
        else:
            macs += (9 * s * s - (3 * s - 1) ** 2) * cin * cout
        macs += 3 * stride_1(s, cout, cout)  # The other three 3x3 convs.
        cin = cout
    return macs


def test_resnet18_forward_flops_match_the_conv_count():
    config = config_lib.from_flat(dict(resnet_depth=18, image_size=32))
    keras.mixed_precision.set_global_policy("float32")
    model = factory.build_model(config, num_classes=10)
    flops, padding = measures.count_graph_flops(
        lambda x: model(x, training=False), tf.TensorSpec((1, 32, 32, 6))
    )
    convs = 2 * 2 * _resnet18_cifar_macs(32)  # 2 views, 2 FLOPs per MAC.
    # About 1.12 GFLOPs of conv per view (FACTS.md: 1.12 GFLOPs forward);
    # heads, bias and residual adds are the rest, about 1%.
    assert convs == pytest.approx(2 * 1.12e9, rel=2e-3)
    assert convs <= flops <= 1.02 * convs
    assert padding == 2 * 2 * _resnet18_cifar_padding_macs(32)


def test_model_convs_of_the_cifar_resnet18():
    config = config_lib.from_flat(dict(resnet_depth=18, image_size=32))
    keras.mixed_precision.set_global_policy("float32")
    model = factory.build_model(config, num_classes=10)
    convs = measures.model_convs(model, 32)
    # The architecture: CIFAR stem, then per group a first block with a
    # (strided from group 2 on) 3x3 conv, a 3x3 conv and a 1x1 projection,
    # and a second block of two 3x3 convs.
    expected = collections.Counter({((32, 32, 3), 3, 64, 1): 1})
    side, cin = 32, 64
    for i, cout in enumerate((64, 128, 256, 512)):
        stride = 1 if i == 0 else 2
        expected[((side, side, cin), 3, cout, stride)] += 1
        expected[((side, side, cin), 1, cout, stride)] += 1
        side //= stride
        expected[((side, side, cout), 3, cout, 1)] += 3
        cin = cout
    got = {
        (c["input"], c["kernel"], c["filters"], c["stride"]): c["count"]
        for c in convs
    }
    assert got == expected
    assert sum(got.values()) == 21  # 17 3x3 convs + 4 projections.
    # Only the stem reads the images: no input gradient there.
    assert [c["input_gradient"] for c in convs] == [False] + [True] * (
        len(convs) - 1
    )


def test_conv_step_times_sum_by_count():
    convs = [
        dict(count=1, input_gradient=False, forward_s=0.02,
             input_gradient_s=0.05, kernel_gradient_s=0.01),
        dict(count=3, input_gradient=True, forward_s=0.10,
             input_gradient_s=0.12, kernel_gradient_s=0.15),
    ]  # fmt: skip
    step = measures.conv_step_times(convs, 256, 50.0)  # 5.12 s a step.
    assert step["forward_s"] == pytest.approx(0.02 + 3 * 0.10)
    assert step["input_gradient_s"] == pytest.approx(3 * 0.12)  # Not the stem.
    assert step["kernel_gradient_s"] == pytest.approx(0.01 + 3 * 0.15)
    # The stem's kernel gradient is faster than its forward: nothing over.
    assert step["gradients_over_forward_s"] == pytest.approx(3 * (0.02 + 0.05))
    assert step["images_per_s_if_gradients_at_forward_speed"] == pytest.approx(
        256 / (5.12 - 0.21)
    )


def test_time_convs_times_the_three_passes_of_a_strided_conv():
    conv = dict(input=(8, 8, 4), kernel=3, filters=8, stride=2, count=2,
                input_gradient=True)  # fmt: skip
    (timed,) = measures.time_convs([conv], 2, "float32", "auto", repeats=1)
    assert {k: timed[k] for k in conv} == conv
    for key in ("forward_s", "input_gradient_s", "kernel_gradient_s"):
        assert 0 < timed[key] < 60
    # 2 examples x 4x4 outputs x 9 taps x 4 x 8 channels, 2 FLOPs each.
    assert timed["gflops"] == pytest.approx(2 * 2 * 16 * 9 * 4 * 8 / 1e9)
    step = measures.conv_step_times([timed], 256, 50.0)
    result = dict(config="float32", images_per_s=50.0, convs=[timed])
    table = measures.format_convs(dict(result, conv_step=step))
    assert "| 8x8x4 | 3x3, 8, 2 | 2 |" in table
    bound = step["images_per_s_if_gradients_at_forward_speed"]
    assert f"{bound:.1f} images/s (measured 50.0)" in table


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_flops_per_s_is_a_plausible_rate(dtype):
    rate = measures.matmul_flops_per_s(n=256, seconds=0.2, dtype=dtype)
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
        useful_train_gflops_per_image=5.89,
        compute_matmul_gflops_per_s=419.4,
        useful_fraction_of_compute_matmul=0.745,
        load_avg_1min_start_end=[1.04, 2.5],
    )
    lines = benchmark.format_table([row]).splitlines()
    assert lines[0].startswith(
        "| config | images/s | first step s | launch to 1st step s |"
    )
    assert lines[2] == (
        "| bf16 | 88.0 | 12.3 | 19.0 | 2.35 | 1.23 | 6.73 | 592 | 470 | 126% "
        "| 5.89 | 419 | 74% | 1.0-2.5 |"
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
    assert measures.top_ops(str(tmp_path), steps=2) == [
        dict(op="Conv2D", ms_per_step=40.0, share=0.8),
        dict(op="AddV2", ms_per_step=10.0, share=0.2),
    ]
    # k=1: the rest is summed as "other".
    assert measures.top_ops(str(tmp_path), steps=2, k=1)[1] == dict(
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
    # The padding products of the 3x3 convs (16x16 input), three passes.
    padding = 3 * 2 * 2 * _resnet18_cifar_padding_macs(16) / 1e9
    assert result["useful_train_gflops_per_image"] == pytest.approx(
        result["train_gflops_per_image"] - padding, abs=2e-3
    )
    # A float32 run compares with the float32 matmul it measured.
    assert result["compute_dtype"] == "float32"
    assert (
        result["compute_matmul_gflops_per_s"] == (result["matmul_gflops_per_s"])
    )
    assert "| float32 |" in proc.stdout
    # The profiled steps (--profile_steps, default 2) found the convolution
    # ops of the step; shares are of the summed op time.
    ops = {o["op"]: o for o in result["top_ops"]}
    assert any("Conv2D" in op for op in ops), ops
    assert sum(o["share"] for o in ops.values()) == pytest.approx(1, abs=0.01)
    assert all(o["ms_per_step"] >= 0 for o in ops.values())
    assert "Op time per step, float32" in proc.stdout
