"""Peak memory of one pretraining step with and without gradient caching.

Usage:
  python scripts/grad_cache_memory.py [--batch_size=1024] \
      [--chunk_sizes=0,256,128] [--resnet_depth=18] [--image_size=32] \
      [--max_rss_gib=16] [--mixed_precision=bfloat16]

For each chunk size (0 = the plain step) a fresh Python process builds the
SimCLR model (`simclr_tf.models.factory.build_model`, CIFAR stem for
image_size <= 32, 3-layer head, linear head for 10 classes), a LARS
optimizer, the pretraining objective (`factory.build_objective`: NT-Xent
with tau 0.5 + supervised CE + weight decay), random two-view images
(batch, H, W, 6), and runs one training step of the library
(`simclr_tf.training.step.make_replica_step`, with gradient caching in
chunks of that many images unless 0) as a `tf.function` on the CPU, in
float32 or under the `--mixed_precision` compute policy (as `run.py
--mixed_precision`). The process reports its
peak resident set size (`ru_maxrss`, which includes the TensorFlow runtime,
the model, the optimizer slots and the step's tracing) and the RSS before
the step; the parent prints a table. A process whose RSS passes
--max_rss_gib is killed (reported as "> limit") so that the measurement
cannot exhaust a shared machine.
"""

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_BATCH = flags.DEFINE_integer("batch_size", 1024, "Images per step.")
_CHUNKS = flags.DEFINE_list(
    "chunk_sizes", ["0", "256", "128"], "Chunk sizes to measure; 0 = plain."
)
_DEPTH = flags.DEFINE_integer("resnet_depth", 18, "ResNet depth.")
_IMAGE = flags.DEFINE_integer("image_size", 32, "Image side in pixels.")
_MAX_RSS = flags.DEFINE_float(
    "max_rss_gib", 16.0, "Kill a measurement above this RSS (GiB)."
)
_PRECISION = flags.DEFINE_enum(
    "mixed_precision",
    "none",
    ["none", "bfloat16"],
    "Compute precision (none: float32; variables are float32 either way).",
)
_WORKER_CHUNK = flags.DEFINE_integer(
    "worker_chunk_size", None, "Internal: measure this chunk size here."
)

GIB = 2.0**30


def _rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / GIB


def _measure(chunk_size: int) -> dict:
    """Runs one step in this process; returns the figures."""
    import keras
    import tensorflow as tf

    from simclr_tf import config as config_lib
    from simclr_tf import optim
    from simclr_tf.models import factory
    from simclr_tf.training import step as step_lib

    batch, size = _BATCH.value, _IMAGE.value
    config = config_lib.from_flat(
        dict(
            resnet_depth=_DEPTH.value,
            image_size=size,
            train_batch_size=batch,
            temperature=0.5,
            weight_decay=1e-4,
        )
    )
    policy = "mixed_bfloat16" if _PRECISION.value == "bfloat16" else "float32"
    keras.utils.set_random_seed(0)
    model = factory.build_model(config, num_classes=10, dtype_policy=policy)
    optimizer = optim.build_optimizer(
        "lars",
        0.1,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
        lars_exclusions=model.weight_groups.lars_exclusions,
    )
    optimizer.build(model.trainable_variables)
    replica_step = step_lib.make_replica_step(
        model,
        optimizer,
        factory.build_objective(config, model),
        grad_cache_chunk_size=chunk_size,
    )
    images = tf.random.uniform((batch, size, size, 6))
    labels = tf.one_hot(tf.random.uniform((batch,), 0, 10, tf.int32), 10)

    @tf.function
    def step(images):
        return replica_step(images, labels)["total_loss"]

    before = _rss_gib()
    start = time.perf_counter()
    loss = float(step(images))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return dict(
        chunk_size=chunk_size,
        batch=batch,
        rss_before_gib=round(before, 2),
        peak_rss_gib=round(peak, 2),
        first_step_s=round(seconds, 1),
        loss=round(loss, 4),
    )


def _run_child(chunk_size: int) -> dict:
    import psutil

    args = [
        sys.executable,
        os.path.abspath(__file__),
        f"--worker_chunk_size={chunk_size}",
        f"--batch_size={_BATCH.value}",
        f"--resnet_depth={_DEPTH.value}",
        f"--image_size={_IMAGE.value}",
        f"--mixed_precision={_PRECISION.value}",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env, text=True)
    watched = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            if watched.memory_info().rss / GIB > _MAX_RSS.value:
                proc.kill()
                proc.wait()
                return dict(chunk_size=chunk_size, killed=True)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not out:
        raise RuntimeError(
            f"chunk_size={chunk_size} failed ({proc.returncode})"
        )
    return json.loads(out[-1])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _WORKER_CHUNK.value is not None:
        print(json.dumps(_measure(_WORKER_CHUNK.value)), flush=True)
        return
    print(
        f"ResNet-{_DEPTH.value}, {_IMAGE.value}x{_IMAGE.value}, batch "
        f"{_BATCH.value} (two views each), one LARS step on the CPU, "
        f"mixed precision {_PRECISION.value}"
    )
    print("chunk | peak RSS GiB | RSS before step GiB | first step s")
    for chunk in map(int, _CHUNKS.value):
        r = _run_child(chunk)
        name = "plain" if chunk == 0 else str(chunk)
        if r.get("killed"):
            print(f"{name:>5} | > {_MAX_RSS.value:.1f} (killed) |  |")
            continue
        print(
            f"{name:>5} | {r['peak_rss_gib']:12.2f} | "
            f"{r['rss_before_gib']:19.2f} | {r['first_step_s']:12.1f}",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
