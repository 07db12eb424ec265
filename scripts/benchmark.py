"""Training throughput of the engine's real step, against the CPU's limit.

Usage:
  python scripts/benchmark.py                  # the default matrix
  python scripts/benchmark.py --configs=bf16 --batch_size=256 --steps=6
  python scripts/benchmark.py --configs=custom --mixed_precision=bfloat16 \
      --jit_compile --input_pipeline=off --onednn=off --replicas=2

Each configuration runs in a fresh Python process (so peak RSS and tracing
time are its own) and (the measuring functions are in
`benchmark_measures.py`):

1. builds the model and optimizer with `experiment.build_model_and_optimizer`
   and trains with the engine's own `step.make_replica_step` (the run's
   objective, `factory.build_objective`) and `step.make_train_loop`, on
   synthetic data: random uint8 32x32 images in memory
   (`sources.ArraySource`) fed through the real input pipeline
   (`input_pipeline.build_distributed_dataset`: shuffle, two augmented
   views, batch, prefetch), so the augmentation costs what it costs in a
   run but no disk is read. `--input_pipeline=off` feeds one fixed batch of
   that pipeline instead, which leaves only the compute;
2. reports the time of the first call (one step: tracing + first
   execution) and the time from the process launch to the end of that
   step: what a run takes to get going; then, after `--warmup_steps`
   more, the median images/s over `--steps` timed steps
   (`--steps_per_loop` steps per call); the peak RSS (`ru_maxrss`) up to
   there, the peak of TensorFlow's CPU allocator (its tensors: weights,
   pipeline buffers and the steps' tensors; the rest of the RSS is the
   runtime itself and the allocator's free memory) and the 1-minute load
   average at start and end;
3. then, after the run's own work (so that neither is in the launch time
   nor its buffers in the peak RSS), measures a dense float32 matmul's
   FLOP/s (2048 x 2048, best of a few seconds), and in a bfloat16 run
   also the bfloat16 matmul's: the machine is shared, so the achieved
   FLOP/s is reported as a fraction of these same-process, same-minute
   figures, never against a number taken at another time; and counts
   the model's forward FLOPs per two-view image from the graph of a
   concrete function (TF profiler `float_ops`: Conv2D, MatMul, BiasAdd
   and elementwise ops, 2 FLOPs per multiply-add); training FLOPs are
   forward x 3 (the backward pass computes two products per forward
   product). "Useful" FLOPs leave out the convolutions' products with
   their zero padding; useful FLOP/s over the matmul in the run's
   compute dtype is how close the step comes to the CPU's GEMM rate
   (`images/s / that fraction` would be the images/s if every needed
   product ran at it);
4. then runs `--profile_steps` more steps under the TF profiler and
   reports the op time per step by op type (`top_ops`): where the compute
   goes. Compare with `pipeline_only` and `*_nopipe` for the input side;
5. with `--conv_times`, then times each distinct convolution of the model
   alone (`model_convs`, `time_convs`: forward pass, input gradient and
   kernel gradient at one step's examples, as the run computes them) and
   reports the sums per step and the images/s the step would reach if
   every gradient ran as fast as the forward convolution of its shape
   (`conv_step_times`): a bound on what faster gradient kernels can give.

The parent prints one JSON line per configuration and a table at the end
(`--json_out` also writes them to a file). An image is one two-view
training example.

Configurations (`--configs`, comma-separated): `float32`, `bf16`
(`--mixed_precision=bfloat16`), `xla` (float32 + `--jit_compile`),
`bf16_xla`, `float32_nopipe`, `bf16_nopipe` (input pipeline off),
`*_unfused` (Keras 3's own batch norm instead of the fused one, for
comparison: `layers.set_fused_training`), `custom` (exactly the flags
given) and `pipeline_only` (the augmentation pipeline alone, no model:
reported below the table).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(SCRIPTS))
sys.path.insert(0, SCRIPTS)  # Also when loaded by path (tests).

import benchmark_measures as measures  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
GIB = 2.0**30

# name -> (mixed_precision, jit_compile, input_pipeline, fused_bn)
PRESETS = {
    "float32": ("none", False, "on", "on"),
    "bf16": ("bfloat16", False, "on", "on"),
    "xla": ("none", True, "on", "on"),
    "bf16_xla": ("bfloat16", True, "on", "on"),
    "float32_nopipe": ("none", False, "off", "on"),
    "bf16_nopipe": ("bfloat16", False, "off", "on"),
    "float32_unfused": ("none", False, "on", "off"),
    "bf16_unfused": ("bfloat16", False, "on", "off"),
    "float32_nopipe_unfused": ("none", False, "off", "off"),
    "bf16_nopipe_unfused": ("bfloat16", False, "off", "off"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every configuration of one benchmark run shares: the flags of
    the same names (see `define_flags`)."""

    batch_size: int
    depth: int
    width_multiplier: int
    image_size: int
    replicas: int
    steps: int
    warmup_steps: int
    steps_per_loop: int
    num_images: int
    profile_steps: int
    matmul_seconds: float
    matmul_n: int
    conv_backward: str = "auto"
    recompute_bn_relu: bool = True
    grad_cache_chunk_size: int = 0
    inter_op_threads: int = 0
    conv_times: bool = False


def benchmark_config(preset: tuple[str, bool, str, str], settings: Settings):
    """The run config of one configuration: flags/cifar10_pretrain.cfg at
    the benchmark's batch size, precision and XLA of the preset."""
    from simclr_tf import config as config_lib

    mixed, jit, _, _ = preset
    return config_lib.from_flat(
        dict(
            train_mode="pretrain",
            lineareval_while_pretraining=True,
            image_size=settings.image_size,
            resnet_depth=settings.depth,
            width_multiplier=settings.width_multiplier,
            train_batch_size=settings.batch_size,
            train_steps=10**6,
            learning_rate=1.0,
            weight_decay=1e-4,
            temperature=0.5,
            use_blur=False,
            color_jitter_strength=0.5,
            mixed_precision=mixed,
            jit_compile=jit,
            cpu_replicas=settings.replicas,
            steps_per_loop=settings.steps_per_loop,
            conv_backward=settings.conv_backward,
            recompute_bn_relu=settings.recompute_bn_relu,
            grad_cache_chunk_size=settings.grad_cache_chunk_size,
            inter_op_threads=settings.inter_op_threads,
            seed=0,
        )
    )


def random_image_source(num_images: int, size: int, num_classes: int = 10):
    """`num_images` random uint8 images with random labels, in memory."""
    import numpy as np

    from simclr_tf.data import sources

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_images, size, size, 3), np.uint8)
    labels = rng.integers(0, num_classes, num_images)
    return sources.ArraySource(
        {"train": (images, labels)},
        class_names=[str(c) for c in range(num_classes)],
        name="random images",
    )


def training_dataset(config, strategy, source, num_views: int, pipeline: bool):
    """The real training pipeline over `source`, or (`pipeline=False`) its
    first batch repeated: the step's compute alone."""
    import tensorflow as tf

    from simclr_tf.data import input_pipeline

    kwargs = dict(is_training=True, pretrain=True, num_views=num_views)
    global_batch = config.train.train_batch_size
    if pipeline:
        return input_pipeline.build_distributed_dataset(
            strategy,
            source,
            config.data,
            global_batch_size=global_batch,
            **kwargs,
        )

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = input_pipeline.build_dataset(
            source,
            config.data,
            batch_size=ctx.get_per_replica_batch_size(global_batch),
            input_context=ctx,
            **kwargs,
        )
        return tf.data.Dataset.from_tensors(next(iter(ds))).repeat()

    return strategy.distribute_datasets_from_function(dataset_fn)


def _train_loop(config, strategy, model, optimizer):
    """The engine's own multi-step training function, with the run's
    objective (`factory.build_objective`)."""
    from simclr_tf.models import factory
    from simclr_tf.training import step as step_lib

    objective = factory.build_objective(config, model)
    return step_lib.make_train_loop(
        strategy,
        step_lib.make_replica_step(
            model,
            optimizer,
            objective,
            config.train.grad_cache_chunk_size,
        ),
        list(objective.metric_names),
        jit_compile=config.runtime.jit_compile,
    )


def _time_steps(loop, iterator, settings: Settings) -> dict:
    """Times the first call (one step), then `settings.steps` steps after
    `settings.warmup_steps` untimed ones."""
    import tensorflow as tf

    start = time.perf_counter()
    loss_first = float(loop(iterator, tf.constant(1, tf.int32))["total_loss"])
    first_step_s = time.perf_counter() - start
    first_step_end = time.time()
    per_loop = settings.steps_per_loop
    n = tf.constant(per_loop, tf.int32)
    for _ in range(-(-settings.warmup_steps // per_loop)):
        float(loop(iterator, n)["total_loss"])
    rates = []
    for _ in range(max(1, settings.steps // per_loop)):
        start = time.perf_counter()
        loss = float(loop(iterator, n)["total_loss"])
        rates.append(
            per_loop * settings.batch_size / (time.perf_counter() - start)
        )
    return dict(
        first_step_s=first_step_s,
        first_step_end=first_step_end,
        rates=rates,
        loss_first=loss_first,
        loss_last=loss,
    )


def _profile_ops(loop, iterator, steps: int) -> list[dict]:
    """`top_ops` of `steps` single-step calls under the TF profiler."""
    import tempfile

    import tensorflow as tf

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            float(loop(iterator, tf.constant(1, tf.int32))["total_loss"])
        tf.profiler.experimental.stop()
        return measures.top_ops(logdir, steps)


def peak_rss() -> float:
    """The process's peak resident set size, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def run_worker(
    name: str,
    preset: tuple[str, bool, str, str],
    settings: Settings,
    launch_time: float = 0.0,
) -> dict:
    """Measures one configuration in this (fresh) process.

    Args:
      name: the configuration's name, echoed in the result.
      preset: (mixed_precision, jit_compile, input_pipeline, fused_bn).
      settings: what every configuration shares.
      launch_time: `time.time()` when the parent launched this process
        (0: launch_to_first_step_s is 0).

    Returns:
      The measurements as a JSON-able dict.
    """
    load_start = os.getloadavg()[0]
    from simclr_tf import devices

    devices.initialize_devices()  # Imports TensorFlow as run.py does.
    import tensorflow as tf

    from simclr_tf import distribute, experiment
    from simclr_tf.models import layers

    config = benchmark_config(preset, settings)
    strategy = distribute.build_strategy(config.runtime)
    size = config.data.image_size
    source = random_image_source(settings.num_images, size)
    model, optimizer = experiment.build_model_and_optimizer(
        config, strategy, source.info
    )
    if preset[3] == "off":  # Keras 3's own (unfused) batch norm everywhere.
        layers.set_fused_training(model, False)
    dataset = training_dataset(
        config, strategy, source, model.num_views, preset[2] == "on"
    )
    iterator = iter(dataset)
    loop = _train_loop(config, strategy, model, optimizer)
    timed = _time_steps(loop, iterator, settings)
    launch_s = timed["first_step_end"] - launch_time if launch_time else 0.0
    peak = peak_rss()
    tensor_peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    # The benchmark's own measurements, after the run's (a run does
    # neither, and their buffers would stay in the peak RSS).
    matmul = measures.matmul_flops_per_s(
        settings.matmul_n, settings.matmul_seconds
    )
    compute_dtype = model.dtype_policy.compute_dtype
    compute_matmul = matmul
    if compute_dtype != "float32":
        compute_matmul = measures.matmul_flops_per_s(
            settings.matmul_n, settings.matmul_seconds, compute_dtype
        )
    forward, padding = measures.count_graph_flops(
        lambda x: model(x, training=False),
        tf.TensorSpec((1, size, size, 3 * model.num_views), tf.float32),
    )
    train_flops = 3 * forward  # Per two-view image: forward + backward.
    useful_flops = 3 * (forward - padding)
    images_per_s = statistics.median(timed["rates"])
    ops = []
    if settings.profile_steps > 0:  # After the timing and the peak RSS.
        ops = _profile_ops(loop, iterator, settings.profile_steps)
    convs, conv_step = [], {}
    if settings.conv_times:
        views = config.train.train_batch_size * model.num_views
        convs = measures.time_convs(
            measures.model_convs(model, size),
            views // strategy.num_replicas_in_sync,
            model.dtype_policy.name,
            settings.conv_backward,
        )
        conv_step = measures.conv_step_times(
            convs, config.train.train_batch_size, images_per_s
        )
    return dict(
        config=name,
        mixed_precision=preset[0],
        jit_compile=preset[1],
        input_pipeline=preset[2],
        fused_bn=preset[3],
        onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0",
        batch=config.train.train_batch_size,
        depth=config.model.resnet_depth,
        image_size=size,
        replicas=strategy.num_replicas_in_sync,
        images_per_s=round(images_per_s, 2),
        images_per_s_samples=[round(r, 2) for r in timed["rates"]],
        first_step_s=round(timed["first_step_s"], 1),
        launch_to_first_step_s=round(launch_s, 1),
        conv_backward=settings.conv_backward,
        recompute_bn_relu=settings.recompute_bn_relu,
        grad_cache_chunk_size=settings.grad_cache_chunk_size,
        inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        peak_rss_gib=round(peak, 2),
        tensor_peak_gib=round(tensor_peak / GIB, 2),
        forward_gflops_per_image=round(forward / 1e9, 3),
        train_gflops_per_image=round(train_flops / 1e9, 3),
        achieved_gflops_per_s=round(images_per_s * train_flops / 1e9, 1),
        matmul_gflops_per_s=round(matmul / 1e9, 1),
        fraction_of_matmul=round(images_per_s * train_flops / matmul, 3),
        compute_dtype=compute_dtype,
        useful_train_gflops_per_image=round(useful_flops / 1e9, 3),
        compute_matmul_gflops_per_s=round(compute_matmul / 1e9, 1),
        useful_fraction_of_compute_matmul=round(
            images_per_s * useful_flops / compute_matmul, 3
        ),
        top_ops=ops,
        convs=convs,
        conv_step=conv_step,
        loss_first=round(timed["loss_first"], 4),
        loss_last=round(timed["loss_last"], 4),
        load_avg_1min_start_end=[
            round(load_start, 2),
            round(os.getloadavg()[0], 2),
        ],
    )


def define_flags() -> None:
    """Defines the script's flags (only when run as a script, so that the
    measuring functions import without touching absl's global flags)."""
    flags.DEFINE_list(
        "configs",
        ["float32", "bf16", "xla", "float32_nopipe", "pipeline_only"],
        "Configurations to run, each in a fresh process (see the docstring).",
    )
    flags.DEFINE_integer("batch_size", 256, "Global images per step.")
    flags.DEFINE_integer("depth", 18, "ResNet depth.")
    flags.DEFINE_integer("width_multiplier", 1, "ResNet width.")
    flags.DEFINE_integer("image_size", 32, "Image side in pixels.")
    flags.DEFINE_integer(
        "replicas", 0, "Split the CPU into this many logical devices (0: one)."
    )
    flags.DEFINE_bool("jit_compile", False, "custom: XLA-compile the step.")
    flags.DEFINE_enum(
        "mixed_precision",
        "none",
        ["none", "bfloat16"],
        "custom: compute dtype policy.",
    )
    flags.DEFINE_enum(
        "onednn", "on", ["on", "off"], "TF_ENABLE_ONEDNN_OPTS in each process."
    )
    flags.DEFINE_enum(
        "input_pipeline",
        "on",
        ["on", "off"],
        "custom: off feeds one fixed batch (compute only).",
    )
    flags.DEFINE_enum(
        "fused_bn",
        "on",
        ["on", "off"],
        "custom: off restores Keras 3's unfused batch norm (for comparison).",
    )
    flags.DEFINE_enum(
        "conv_backward",
        "auto",
        ["auto", "tf", "matmul"],
        "--conv_backward of the runs (tf: TensorFlow's own conv gradients).",
    )
    flags.DEFINE_bool(
        "recompute_bn_relu", True, "--recompute_bn_relu of the runs."
    )
    flags.DEFINE_integer(
        "grad_cache_chunk_size",
        0,
        "--grad_cache_chunk_size of the runs (0: one pass per batch).",
    )
    flags.DEFINE_integer(
        "inter_op_threads", 0, "--inter_op_threads of the runs (0: auto)."
    )
    flags.DEFINE_bool(
        "conv_times",
        False,
        "After the rest, time each distinct convolution of the model alone "
        "(forward, input gradient, kernel gradient; one step's examples).",
    )
    flags.DEFINE_integer("steps", 6, "Timed steps per configuration.")
    flags.DEFINE_integer(
        "warmup_steps", 1, "Untimed steps after the first (traced) one."
    )
    flags.DEFINE_integer(
        "steps_per_loop", 1, "Steps per tf.function call (one timing sample)."
    )
    flags.DEFINE_integer(
        "num_images", 2048, "Random uint8 images in the in-memory dataset."
    )
    flags.DEFINE_integer(
        "profile_steps",
        2,
        "Steps run under the TF profiler after the timing, for the op-time "
        "breakdown (0: none).",
    )
    flags.DEFINE_float(
        "matmul_seconds", 2.0, "Time spent on each matmul measurement."
    )
    flags.DEFINE_integer("matmul_n", 2048, "Matmul side.")
    flags.DEFINE_string("json_out", None, "Also write JSON here.")
    flags.DEFINE_string(
        "worker", None, "Internal: run this configuration in this process."
    )
    flags.DEFINE_float(
        "launch_time", 0.0, "Internal: time.time() when the parent launched."
    )


def run_pipeline_worker(settings: Settings) -> dict:
    """Measures the input pipeline alone, in this (fresh) process.

    Builds the benchmark's training pipeline (as `run_worker` with the
    pipeline on), reads warm-up batches (more than prefetch can hold
    ready), then times `2 * settings.steps` (at least 8) batches with
    nothing else running in the process; samples are per pair of batches.

    Returns:
      {"config": "pipeline_only", "images_per_s": over all timed, ...}.
    """
    load_start = os.getloadavg()[0]
    from simclr_tf import devices, distribute
    from simclr_tf.models import factory

    devices.initialize_devices()

    config = benchmark_config(PRESETS["float32"], settings)
    strategy = distribute.build_strategy(config.runtime)
    source = random_image_source(settings.num_images, config.data.image_size)
    dataset = training_dataset(
        config, strategy, source, factory.PRETRAIN_VIEWS, pipeline=True
    )
    iterator = iter(dataset)
    start = time.perf_counter()
    next(iterator)
    first_s = time.perf_counter() - start
    for _ in range(4):
        next(iterator)
    batch = config.train.train_batch_size
    times = []
    for _ in range(max(4, settings.steps)):
        start = time.perf_counter()
        for _ in range(2):
            next(iterator)
        times.append(time.perf_counter() - start)
    rates = [2 * batch / t for t in times]
    peak = peak_rss()
    return dict(
        config="pipeline_only",
        batch=batch,
        images_per_s=round(2 * batch * len(times) / sum(times), 2),
        images_per_s_samples=[round(r, 2) for r in rates],
        first_batch_s=round(first_s, 1),
        peak_rss_gib=round(peak, 2),
        load_avg_1min_start_end=[
            round(load_start, 2),
            round(os.getloadavg()[0], 2),
        ],
    )


# The flags a parent passes to each worker: the settings and the preset.
PRESET_FLAGS = ("mixed_precision", "jit_compile", "input_pipeline", "fused_bn")


def _settings() -> Settings:
    return Settings(
        **{f.name: FLAGS[f.name].value for f in dataclasses.fields(Settings)}
    )


def _preset(name: str) -> tuple[str, bool, str, str]:
    if name == "custom":
        return tuple(FLAGS[flag].value for flag in PRESET_FLAGS)
    if name not in PRESETS:
        raise app.UsageError(
            f"Received: --configs={name}. Use one of "
            f"{', '.join([*PRESETS, 'custom', 'pipeline_only'])}."
        )
    return PRESETS[name]


def _run_child(name: str) -> dict:
    names = [f.name for f in dataclasses.fields(Settings)] + list(PRESET_FLAGS)
    passed = [f"--{flag}={FLAGS[flag].value}" for flag in names]
    args = [sys.executable, os.path.abspath(__file__), f"--worker={name}"]
    args.append(f"--launch_time={time.time()!r}")
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        TF_ENABLE_ONEDNN_OPTS="1" if FLAGS.onednn == "on" else "0",
    )
    proc = subprocess.run(
        args + passed, capture_output=True, text=True, env=env, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"Configuration {name} failed ({proc.returncode}):\n"
            f"{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


TABLE_COLUMNS = (
    ("config", "config", "{}"),
    ("images/s", "images_per_s", "{:.1f}"),
    ("first step s", "first_step_s", "{:.1f}"),
    ("launch to 1st step s", "launch_to_first_step_s", "{:.1f}"),
    ("peak RSS GiB", "peak_rss_gib", "{:.2f}"),
    ("tensor peak GiB", "tensor_peak_gib", "{:.2f}"),
    ("GFLOPs/image", "train_gflops_per_image", "{:.2f}"),
    ("GFLOP/s", "achieved_gflops_per_s", "{:.0f}"),
    ("matmul GFLOP/s", "matmul_gflops_per_s", "{:.0f}"),
    ("of matmul", "fraction_of_matmul", "{:.0%}"),
    ("useful GFLOPs/image", "useful_train_gflops_per_image", "{:.2f}"),
    ("compute-dtype matmul GFLOP/s", "compute_matmul_gflops_per_s", "{:.0f}"),
    ("useful of it", "useful_fraction_of_compute_matmul", "{:.0%}"),
    ("load avg", "load_avg_1min_start_end", "{0[0]:.1f}-{0[1]:.1f}"),
)


def format_table(results: list[dict]) -> str:
    """A Markdown table of the results, one row per configuration."""
    head = "| " + " | ".join(c[0] for c in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    rows = [
        "| "
        + " | ".join(fmt.format(r[key]) for _, key, fmt in TABLE_COLUMNS)
        + " |"
        for r in results
    ]
    return "\n".join([head, rule, *rows])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.worker is not None:
        if FLAGS.worker == "pipeline_only":
            result = run_pipeline_worker(_settings())
        else:
            preset = _preset(FLAGS.worker)
            result = run_worker(
                FLAGS.worker, preset, _settings(), FLAGS.launch_time
            )
        print(json.dumps(result), flush=True)
        return
    presets = {
        name: _preset(name) for name in FLAGS.configs if name != "pipeline_only"
    }
    print(
        f"ResNet-{FLAGS.depth} x{FLAGS.width_multiplier}, {FLAGS.image_size}x"
        f"{FLAGS.image_size}, batch {FLAGS.batch_size} (two views each), "
        f"oneDNN {FLAGS.onednn}, {os.cpu_count()} CPUs",
        flush=True,
    )
    results = []
    for name in presets:
        result = _run_child(name)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(format_table(results))
    for result in results:
        if result["top_ops"]:
            print(
                f"Op time per step, {result['config']} (TF profiler): "
                + ", ".join(
                    f"{o['op']} {o['ms_per_step']:.0f} ms ({o['share']:.0%})"
                    for o in result["top_ops"]
                )
            )
        if result["convs"]:
            print(measures.format_convs(result))
    if "pipeline_only" in FLAGS.configs:
        result = _run_child("pipeline_only")
        print(json.dumps(result), flush=True)
        print(
            f"Input pipeline alone (augmentation, two views): "
            f"{result['images_per_s']:.1f} images/s, load average "
            "{0[0]:.1f}-{0[1]:.1f}".format(result["load_avg_1min_start_end"])
        )
        results.append(result)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
