"""NT-Xent under MultiWorkerMirroredStrategy: 2 processes on 127.0.0.1.

The test starts this file twice as a script (one process per worker, each
with its TF_CONFIG); each worker writes its replica's loss and gradients,
which must equal the single-replica computation on the global batch.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import losses

N_LOCAL, D_IN, D_OUT, TAU = 3, 5, 4, 0.2
TIMEOUT_S = 240


def _case():
    """Global inputs (2N, D_IN), view-major, and the projection matrix."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(4 * N_LOCAL, D_IN)).astype(np.float32)
    w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
    return x, w


def _local_rows(worker: int) -> np.ndarray:
    own = np.arange(worker * N_LOCAL, (worker + 1) * N_LOCAL)
    return np.concatenate([own, 2 * N_LOCAL + own])  # view 1, then view 2


def _worker_main(index: int, ports: list[int], out: str) -> None:
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x_global, w_init = _case()
    with strategy.scope():
        w = tf.Variable(w_init)
    x_local = tf.constant(x_global[_local_rows(index)])

    @tf.function
    def run():
        def replica_step():
            ctx = tf.distribute.get_replica_context()
            x = tf.identity(x_local)
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss, _, _ = losses.nt_xent_loss(
                    tf.matmul(x, w), temperature=TAU, replica_context=ctx
                )
                scaled = loss / ctx.num_replicas_in_sync
            grad_x, grad_w = tape.gradient(scaled, [x, w])
            grad_w = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grad_w)
            return loss, grad_x, grad_w

        return strategy.run(replica_step)

    loss, grad_x, grad_w = (
        strategy.experimental_local_results(t)[0] for t in run()
    )
    np.savez(out, loss=loss.numpy(), grad_x=grad_x.numpy(), grad_w=grad_w)


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_equal_one_replica(tmp_path):
    ports = _free_ports(2)
    repo = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(repo), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
    )
    env.pop("TF_CONFIG", None)
    outs = [tmp_path / f"worker{i}.npz" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(i), *map(str, ports), str(outs[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0].decode()[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log

    x_global, w_init = _case()
    x, w = tf.constant(x_global), tf.Variable(w_init)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss1, _, _ = losses.nt_xent_loss(tf.matmul(x, w), temperature=TAU)
    grad_x1, grad_w1 = (g.numpy() for g in tape.gradient(loss1, [x, w]))

    results = [np.load(o) for o in outs]
    mean_loss = np.mean([r["loss"] for r in results])
    np.testing.assert_allclose(mean_loss, loss1.numpy(), rtol=1e-5, atol=1e-5)
    for i, r in enumerate(results):
        np.testing.assert_allclose(r["grad_w"], grad_w1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            r["grad_x"], grad_x1[_local_rows(i)], rtol=1e-5, atol=1e-5
        )


if __name__ == "__main__":
    _worker_main(
        int(sys.argv[1]), [int(sys.argv[2]), int(sys.argv[3])], sys.argv[4]
    )
