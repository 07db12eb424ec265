"""What `scripts/benchmark.py` measures besides the training step itself.

* the CPU's limit: `matmul_flops_per_s`, a dense matmul's FLOP/s in this
  process (float32 or bfloat16);
* the work: `count_graph_flops`, a traced function's FLOPs and how many of
  them its convolutions spend on zero padding;
* where a step's time goes: `top_ops`, op time by op type from a TF
  profile;
* what the convolutions cost one by one: `model_convs` reads a model's
  distinct convolutions from its graph, `time_convs` times each alone
  (forward pass, input gradient, kernel gradient, as the run computes
  them), `conv_step_times` sums them per step and bounds the images/s
  faster gradient kernels could give, `format_convs` prints them.

No flags and no TensorFlow at import: the benchmark's parent process
imports this module without starting TensorFlow.
"""

from __future__ import annotations

import os
import statistics
import time


def matmul_flops_per_s(
    n: int = 2048, seconds: float = 2.0, dtype: str = "float32"
) -> float:
    """Dense matmul throughput of this process, in FLOP/s.

    Runs chained `n x n` matmuls (2 n^3 FLOPs each) in a `tf.function`
    for about `seconds` and returns the best of the timed calls: a
    shared machine only ever slows a call down.

    Args:
      n: matrix side.
      seconds: approximate time to spend.
      dtype: the matrices' dtype ("bfloat16": oneDNN's bf16 GEMM).

    Returns:
      FLOP/s of the fastest call.
    """
    import tensorflow as tf

    a = tf.cast(tf.random.uniform((n, n)), dtype)
    b = tf.cast(tf.random.uniform((n, n)) / n, dtype)
    reps = 4

    @tf.function
    def run(x):
        for _ in range(reps):
            x = tf.matmul(x, b)
        return tf.reduce_sum(tf.cast(x, tf.float32))

    run(a).numpy()  # Trace and warm up.
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        run(a).numpy()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2.0 * n**3 * reps / best


def _conv_padding_flops(op) -> int:
    """FLOPs a Conv2D op (NHWC) spends on zero padding: its SAME or
    EXPLICIT padding, or a VALID conv of a zero `tf.pad` output."""
    import tensorflow as tf

    x, kernel = op.inputs[0], op.inputs[1]
    sizes = x.shape[1:3]
    outs = op.outputs[0].shape[1:3]
    taps = kernel.shape[0:2]
    strides = op.get_attr("strides")[1:3]
    padding = op.get_attr("padding").decode()
    if padding == "SAME":
        befores = [
            max((outs[a] - 1) * strides[a] + taps[a] - sizes[a], 0) // 2
            for a in (0, 1)
        ]
    elif padding == "EXPLICIT":
        befores = op.get_attr("explicit_paddings")[2:6:2]
    elif x.op.type == "Pad":  # VALID on tf.pad's (zero) output.
        befores = tf.get_static_value(x.op.inputs[1])[1:3, 0]
        sizes = x.op.inputs[0].shape[1:3]
    else:
        return 0
    # Per axis, the (output, tap) pairs whose input is not padding.
    pairs = [
        sum(
            0 <= strides[a] * o + t - befores[a] < sizes[a]
            for o in range(outs[a])
            for t in range(taps[a])
        )
        for a in (0, 1)
    ]
    dense = outs[0] * taps[0] * outs[1] * taps[1]
    c_in, c_out = kernel.shape[2:4]
    return 2 * x.shape[0] * (dense - pairs[0] * pairs[1]) * c_in * c_out


def count_graph_flops(fn, *specs) -> tuple[int, int]:
    """FLOPs of one call of `fn`, counted on its traced graph.

    Uses the TF profiler's registered per-op statistics (Conv2D and MatMul
    count 2 per multiply-add; BiasAdd, Add, Mul, ... one per element).
    Ops without a registered count (batch norm, pooling, ...) add nothing.
    The profiler counts a convolution densely, products with its zero
    padding included; the second number counts those products, which an
    implementation need not compute (oneDNN's forward convolutions skip
    them).

    Args:
      fn: a Python callable of tensors.
      *specs: `tf.TensorSpec`s of its arguments, fully defined.

    Returns:
      (the total float operations of the graph, of which on the Conv2D
      ops' zero padding).
    """
    import tensorflow as tf

    concrete = tf.function(fn).get_concrete_function(*specs)
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    info = tf.compat.v1.profiler.profile(
        graph=concrete.graph, run_meta=None, cmd="op", options=opts
    )
    padding = sum(
        _conv_padding_flops(op)
        for op in concrete.graph.get_operations()
        if op.type == "Conv2D"
    )
    return int(info.total_float_ops), padding


def model_convs(model, image_size: int) -> list[dict]:
    """The distinct convolutions of `model`'s forward pass and how often
    each occurs, read from the graph of one traced call.

    A VALID conv of a `tf.pad` output is recorded with the pad's input (the
    unpadded input `layers.Conv2DFixedPadding` takes). The first conv of
    the graph reads the images, so a step needs no input gradient there.

    Args:
      model: a `SimCLRModel` (input: `num_views` RGB images stacked on
        the channel axis).
      image_size: its input's side.

    Returns:
      [{"input": (H, W, C), "kernel": k, "filters": F, "stride": s,
      "count": n, "input_gradient": bool}, ...] in graph order.
    """
    import tensorflow as tf

    spec = tf.TensorSpec(
        (1, image_size, image_size, 3 * model.num_views), tf.float32
    )
    graph = (
        tf.function(lambda x: model(x, training=False))
        .get_concrete_function(spec)
        .graph
    )
    convs = {}
    for op in graph.get_operations():
        if op.type != "Conv2D":
            continue
        x = op.inputs[0]
        if x.op.type == "Pad":
            x = x.op.inputs[0]
        kernel = op.inputs[1].shape
        key = (
            tuple(x.shape[1:]),
            kernel[0],
            kernel[3],
            op.get_attr("strides")[1],
        )
        if key not in convs:
            convs[key] = dict(
                input=key[0],
                kernel=key[1],
                filters=key[2],
                stride=key[3],
                count=0,
                input_gradient=bool(convs),
            )
        convs[key]["count"] += 1
    return list(convs.values())


def time_convs(
    convs: list[dict],
    batch: int,
    dtype_policy: str,
    backward: str,
    repeats: int = 7,
) -> list[dict]:
    """Each of `convs` (`model_convs`) timed alone, as a run computes it.

    A `layers.Conv2DFixedPadding` of the conv's shape, `dtype_policy` and
    `backward`: the median of `repeats` calls of its forward pass, of its
    input gradient and of its kernel gradient, each a `tf.function` of
    its own, on random inputs.

    Args:
      convs: `model_convs`' list.
      batch: examples per call (a step's views on one replica).
      dtype_policy: the Keras dtype policy name ("mixed_bfloat16", ...).
      backward: the run's `--conv_backward`.
      repeats: timed calls per pass (after one untimed).

    Returns:
      `convs`' dicts with "forward_s", "input_gradient_s",
      "kernel_gradient_s" and "gflops" (dense, one pass) added.
    """
    import keras
    import tensorflow as tf

    from simclr_tf.models import layers

    timed = []
    for conv in convs:
        layer = layers.Conv2DFixedPadding(
            conv["filters"],
            conv["kernel"],
            conv["stride"],
            backward=backward,
            dtype=keras.DTypePolicy(dtype_policy),
        )
        x = tf.cast(
            tf.random.normal((batch, *conv["input"])), layer.compute_dtype
        )
        forward_s, input_s, kernel_s, out = _time_conv(layer, x, repeats)
        timed.append(
            dict(
                conv,
                forward_s=forward_s,
                input_gradient_s=input_s,
                kernel_gradient_s=kernel_s,
                gflops=2e-9
                * batch
                * out[0]
                * out[1]
                * conv["kernel"] ** 2
                * conv["input"][2]
                * conv["filters"],
            )
        )
    return timed


def _time_conv(layer, x, repeats: int) -> tuple[float, float, float, tuple]:
    """Median seconds of `layer`'s forward pass, input gradient and kernel
    gradient at `x`, and the output's (H, W)."""
    import tensorflow as tf

    y = layer(x)  # Builds the layer.
    dy = tf.cast(tf.random.normal(y.shape), y.dtype)

    def gradients(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return tape.gradient(y, [x, layer.kernel], output_gradients=dy)

    def median_s(fn, *args) -> float:
        fn(*args)  # Trace and warm up.
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args).numpy()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return (
        median_s(tf.function(layer), x),
        median_s(tf.function(lambda x, dy: gradients(x, dy)[0]), x, dy),
        median_s(tf.function(lambda x, dy: gradients(x, dy)[1]), x, dy),
        tuple(y.shape[1:3]),
    )


def conv_step_times(
    convs: list[dict], batch_size: int, images_per_s: float
) -> dict:
    """Seconds per step of the timed `convs` (`time_convs`, one step's
    examples), each conv counted as often as the model has it.

    "gradients_over_forward_s" is what the gradients take beyond their
    conv's forward time (the same products): the step would be that much
    shorter if every gradient a step computes ran as fast as the forward
    convolution of its shape, and train at
    "images_per_s_if_gradients_at_forward_speed" instead of the measured
    `images_per_s` (steps of `batch_size` images). The first conv's input
    gradient is not computed by a step and is left out.

    Args:
      convs: `time_convs`' list.
      batch_size: images per step.
      images_per_s: the step's measured rate.

    Returns:
      {"forward_s", "input_gradient_s", "kernel_gradient_s",
      "gradients_over_forward_s", "images_per_s_if_gradients_at_forward_speed"}.
    """
    total = dict(
        forward_s=0.0,
        input_gradient_s=0.0,
        kernel_gradient_s=0.0,
        gradients_over_forward_s=0.0,
    )
    for conv in convs:
        n, forward = conv["count"], conv["forward_s"]
        grads = [conv["kernel_gradient_s"]]
        if conv["input_gradient"]:
            grads.append(conv["input_gradient_s"])
            total["input_gradient_s"] += n * conv["input_gradient_s"]
        total["forward_s"] += n * forward
        total["kernel_gradient_s"] += n * conv["kernel_gradient_s"]
        total["gradients_over_forward_s"] += n * sum(
            max(g - forward, 0.0) for g in grads
        )
    step_s = batch_size / images_per_s
    total["images_per_s_if_gradients_at_forward_speed"] = batch_size / (
        step_s - total["gradients_over_forward_s"]
    )
    return total


def top_ops(logdir: str, steps: int, k: int = 8) -> list[dict]:
    """Where a profiled step's op time goes, by op type.

    Reads the `*.xplane.pb` that `tf.profiler.experimental` wrote under
    `logdir` (with TF's own `xplane_pb2`; no profiler plugin needed). On
    CPU the executor records each op run on a `tf_Compute` thread as an
    event named `<node name>:<op type>` lasting from its start to its end
    (its intra-op threads included); events are summed per op type.
    Executor ops may overlap (two inter-op threads), so shares are of the
    summed op time, not of the wall time.

    Args:
      logdir: the profiler's log directory.
      steps: the number of steps profiled (times are per step).
      k: how many op types to return (the rest are summed as `other`).

    Returns:
      [{"op": type, "ms_per_step": ..., "share": ...}, ...], largest first.
    """
    import collections
    import glob

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    totals = collections.Counter()
    pattern = os.path.join(logdir, "**", "*.xplane.pb")
    for path in glob.glob(pattern, recursive=True):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_Compute"):
                    continue
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    node, colon, op = name.rpartition(":")
                    # "<node>:<op type>"; not "ExecutorState::Process" etc.
                    if node and colon and not node.endswith(":"):
                        totals[op] += event.duration_ps
    total = sum(totals.values())
    if total == 0:
        raise RuntimeError(f"No op events in the profile under {logdir}.")
    ranked = totals.most_common(k)
    rest = total - sum(ps for _, ps in ranked)
    if rest:
        ranked.append(("other", rest))
    return [
        dict(
            op=op,
            ms_per_step=round(ps / 1e9 / steps, 1),
            share=round(ps / total, 3),
        )
        for op, ps in ranked
    ]


def format_convs(result: dict) -> str:
    """The per-conv times of a result (`--conv_times`) and their sums."""
    lines = [
        f"Convolutions of {result['config']}, each alone at one step's "
        "examples: median ms (dense GFLOP/s)",
        "| input | kernel, filters, stride | count | forward | input gradient "
        "| kernel gradient |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["convs"]:
        cells = [
            "x".join(map(str, c["input"])),
            f"{c['kernel']}x{c['kernel']}, {c['filters']}, {c['stride']}",
            str(c["count"]),
        ]
        for key in ("forward_s", "input_gradient_s", "kernel_gradient_s"):
            unused = key == "input_gradient_s" and not c["input_gradient"]
            cells.append(
                f"{c[key] * 1e3:.0f} ({c['gflops'] / c[key]:.0f})"
                + (" not in a step" if unused else "")
            )
        lines.append("| " + " | ".join(cells) + " |")
    step = result["conv_step"]
    lines.append(
        f"Per step: forward {step['forward_s'] * 1e3:.0f} ms, input "
        f"gradients {step['input_gradient_s'] * 1e3:.0f} ms, kernel "
        f"gradients {step['kernel_gradient_s'] * 1e3:.0f} ms; every gradient "
        "at its forward's speed would save "
        f"{step['gradients_over_forward_s'] * 1e3:.0f} ms: "
        f"{step['images_per_s_if_gradients_at_forward_speed']:.1f} images/s "
        f"(measured {result['images_per_s']:.1f})."
    )
    return "\n".join(lines)
