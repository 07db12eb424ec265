"""Tests of simclr_tf.losses against a closed-form NumPy NT-Xent (SPEC §5)."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import losses
from tests.helpers import two_replica_strategy

# ---------------------------------------------------------------------------
# Independent NumPy reference, written from SPEC.md §5.


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def np_nt_xent(hidden_global, tau, hidden_norm, num_replicas=1):
    """Per-replica NT-Xent losses, logits_ab and labels on a global batch.

    `hidden_global` is (2N, d), view-major over the global batch:
    rows [0, N) first views, [N, 2N) second views; replica r owns global
    images [r * n, (r + 1) * n).
    """
    h = np.asarray(hidden_global, np.float64)
    if hidden_norm:
        h = h / np.linalg.norm(h, axis=1, keepdims=True)
    big_n = h.shape[0] // 2
    n = big_n // num_replicas
    h1_all, h2_all = h[:big_n], h[big_n:]
    out = []
    for r in range(num_replicas):
        rows = np.arange(r * n, (r + 1) * n)
        h1, h2 = h1_all[rows], h2_all[rows]
        mask = np.zeros((n, big_n))
        mask[np.arange(n), rows] = 1.0
        labels = np.zeros((n, 2 * big_n))
        labels[np.arange(n), rows] = 1.0
        aa = h1 @ h1_all.T / tau - 1e9 * mask
        bb = h2 @ h2_all.T / tau - 1e9 * mask
        ab = h1 @ h2_all.T / tau
        ba = h2 @ h1_all.T / tau
        loss_a = -(labels * _log_softmax(np.concatenate([ab, aa], 1))).sum(1)
        loss_b = -(labels * _log_softmax(np.concatenate([ba, bb], 1))).sum(1)
        out.append((np.mean(loss_a + loss_b), ab, labels))
    return out


# ---------------------------------------------------------------------------
# Single replica.


@pytest.mark.parametrize(
    "n,dim,tau,norm",
    [
        (1, 4, 0.1, True),
        (3, 2, 0.5, True),
        (8, 16, 0.1, True),
        (8, 16, 1.0, False),
        (5, 7, 0.2, False),
        (16, 32, 0.07, True),
    ],
)
def test_nt_xent_matches_numpy(n, dim, tau, norm):
    rng = np.random.default_rng(n * 100 + dim)
    hidden = rng.normal(size=(2 * n, dim)).astype(np.float32)
    if not norm:
        hidden *= 0.3  # keep un-normalised logits in a sane range
    loss, logits_ab, labels = losses.nt_xent_loss(
        tf.constant(hidden), temperature=tau, hidden_norm=norm
    )
    want_loss, want_ab, want_labels = np_nt_xent(hidden, tau, norm)[0]
    np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits_ab.numpy(), want_ab, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(labels.numpy(), want_labels)
    assert loss.dtype == tf.float32


def test_nt_xent_loss_value_by_hand():
    # n = 2, hidden_norm off, tau = 1; h1 = h2 = [e1, e2]. Row 0 of loss_a
    # has logits [ab = (1, 0), aa = (1 - 1e9, 0)] and positive column 0:
    # CE = -log(e / (e + 1 + 0 + 1)). Every row and direction is alike.
    h = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)
    loss, _, _ = losses.nt_xent_loss(
        tf.constant(h), temperature=1.0, hidden_norm=False
    )
    per_direction = -np.log(np.e / (np.e + 2.0))
    np.testing.assert_allclose(loss.numpy(), 2 * per_direction, rtol=1e-6)


def test_nt_xent_half_precision_is_computed_in_float32():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(8, 6)).astype(np.float32)
    loss, logits_ab, _ = losses.nt_xent_loss(
        tf.constant(hidden, tf.bfloat16), temperature=0.1
    )
    assert loss.dtype == tf.float32 and logits_ab.dtype == tf.float32
    rounded = tf.cast(tf.cast(hidden, tf.bfloat16), tf.float32).numpy()
    want = np_nt_xent(rounded, 0.1, True)[0][0]
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-5)


def test_nt_xent_default_replica_context_is_single_replica():
    rng = np.random.default_rng(1)
    hidden = tf.constant(rng.normal(size=(6, 4)).astype(np.float32))
    ctx = tf.distribute.get_replica_context()  # the default strategy's
    got = losses.nt_xent_loss(hidden, temperature=0.5, replica_context=ctx)
    want = losses.nt_xent_loss(hidden, temperature=0.5)
    np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())


def test_nt_xent_rejects_odd_rows():
    with pytest.raises(ValueError, match="even number of rows"):
        losses.nt_xent_loss(tf.zeros((3, 4)), temperature=0.1)


@pytest.mark.parametrize("norm", [True, False])
def test_nt_xent_gradient_matches_finite_differences(norm):
    rng = np.random.default_rng(7)
    hidden = rng.normal(size=(6, 3))  # float64: n = 3, d = 3
    tau = 0.3

    def f(h):
        return losses.nt_xent_loss(
            tf.constant(h), temperature=tau, hidden_norm=norm
        )[0].numpy()

    x = tf.constant(hidden)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = losses.nt_xent_loss(x, temperature=tau, hidden_norm=norm)[0]
    grad = tape.gradient(loss, x).numpy()
    assert loss.dtype == tf.float64
    eps = 1e-6
    numeric = np.zeros_like(hidden)
    for idx in np.ndindex(*hidden.shape):
        plus, minus = hidden.copy(), hidden.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (f(plus) - f(minus)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_contrastive_metrics():
    # Row 0 picks its positive (column 0), row 1 picks column 0 (wrong).
    logits_ab = np.array([[3.0, 1.0, 0.0], [2.0, 1.0, 0.5]], np.float32)
    labels = np.zeros((2, 6), np.float32)
    labels[0, 0] = labels[1, 1] = 1.0
    acc, entropy = losses.contrastive_metrics(logits_ab, labels)
    p = np.exp(logits_ab) / np.exp(logits_ab).sum(1, keepdims=True)
    want_entropy = -np.mean((p * np.log(p + 1e-8)).sum(1))
    np.testing.assert_allclose(acc.numpy(), 0.5)
    np.testing.assert_allclose(entropy.numpy(), want_entropy, rtol=1e-6)


def test_supervised_loss():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], np.float32)
    labels = np.eye(3, dtype=np.float32)[[0, 2]]
    want = np.mean(-(labels * _log_softmax(logits.astype(np.float64))).sum(1))
    got = losses.supervised_loss(labels, tf.constant(logits, tf.float16))
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-3)
    got32 = losses.supervised_loss(labels, logits)
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-6)


def np_distillation(teacher, student, t):
    """T^2 * row mean of -sum softmax(teacher/T) * log softmax(student/T)."""
    log_q = _log_softmax(teacher / t)
    return t**2 * np.mean(-(np.exp(log_q) * _log_softmax(student / t)).sum(1))


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0, 4.0])
def test_distillation_loss_matches_numpy(t):
    rng = np.random.default_rng(11)
    teacher = rng.normal(size=(5, 7)) * 3
    student = rng.normal(size=(5, 7)) * 3
    got = losses.distillation_loss(teacher, student, temperature=t)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(
        got.numpy(), np_distillation(teacher, student, t), rtol=1e-12
    )
    # Same teacher and student: the loss is T^2 * the teacher's entropy.
    log_q = _log_softmax(teacher / t)
    entropy = -np.mean((np.exp(log_q) * log_q).sum(1))
    np.testing.assert_allclose(
        losses.distillation_loss(teacher, teacher, temperature=t).numpy(),
        t**2 * entropy,
        rtol=1e-12,
    )


def test_distillation_loss_half_precision_student_in_float32():
    rng = np.random.default_rng(2)
    teacher = rng.normal(size=(4, 5)).astype(np.float32)
    student = rng.normal(size=(4, 5)).astype(np.float32)
    got = losses.distillation_loss(
        teacher, tf.constant(student, tf.bfloat16), temperature=2.0
    )
    assert got.dtype == tf.float32
    rounded = tf.cast(tf.constant(student, tf.bfloat16), tf.float64).numpy()
    np.testing.assert_allclose(
        got.numpy(),
        np_distillation(teacher.astype(np.float64), rounded, 2.0),
        rtol=1e-5,
    )


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_distillation_gradient_matches_finite_differences(t):
    rng = np.random.default_rng(5)
    teacher = tf.constant(rng.normal(size=(3, 4)))
    student = rng.normal(size=(3, 4))
    x = tf.constant(student)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, teacher])
        loss = losses.distillation_loss(teacher, x, temperature=t)
    grad = tape.gradient(loss, x).numpy()
    # The teacher is a constant target: no gradient flows into it.
    assert tape.gradient(loss, teacher) is None
    # Closed form: T * (softmax(s / T) - softmax(t / T)) / b.
    p = np.exp(_log_softmax(student / t))
    q = np.exp(_log_softmax(teacher.numpy() / t))
    np.testing.assert_allclose(grad, t * (p - q) / 3, rtol=1e-10)
    eps = 1e-6
    numeric = np.zeros_like(student)
    for idx in np.ndindex(*student.shape):
        plus, minus = student.copy(), student.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (
            np_distillation(teacher.numpy(), plus, t)
            - np_distillation(teacher.numpy(), minus, t)
        ) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------
# Two replicas (MirroredStrategy over 2 logical CPUs) vs one.


@pytest.fixture(scope="module")
def strategy():
    # One strategy per process: two MirroredStrategy objects over the same
    # devices reuse collective instance keys and abort with "Shape mismatch
    # in the collective instance 100" (TF 2.21).
    return two_replica_strategy()


def _projected(x, w):
    return tf.matmul(x, w)  # (rows, d)


def _two_replica_case(n=4, d_in=5, d=6, seed=3):
    """Returns (global inputs, per-replica inputs, W) for 2 replicas."""
    rng = np.random.default_rng(seed)
    global_n = 2 * n
    x_global = rng.normal(size=(2 * global_n, d_in)).astype(np.float32)
    w = rng.normal(size=(d_in, d)).astype(np.float32)
    # Replica r holds [view-1 rows of its images; view-2 rows of them].
    x_local = [
        np.concatenate(
            [
                x_global[r * n : (r + 1) * n],
                x_global[global_n + r * n : global_n + (r + 1) * n],
            ]
        )
        for r in range(2)
    ]
    return x_global, x_local, w


@pytest.mark.parametrize("tau,norm", [(0.1, True), (0.5, False)])
def test_two_replicas_equal_one_replica(strategy, tau, norm):
    n = 4
    x_global, x_local, w_init = _two_replica_case(n=n)
    with strategy.scope():
        w = tf.Variable(w_init)
    inputs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x_local[ctx.replica_id_in_sync_group])
    )

    def replica_step(x):
        ctx = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss, logits_ab, labels = losses.nt_xent_loss(
                _projected(x, w),
                temperature=tau,
                hidden_norm=norm,
                replica_context=ctx,
            )
            scaled = loss / ctx.num_replicas_in_sync
        grad_x, grad_w = tape.gradient(scaled, [x, w])
        return loss, grad_x, grad_w, logits_ab, labels

    run = tf.function(lambda x: strategy.run(replica_step, args=(x,)))
    per_replica = [strategy.experimental_local_results(t) for t in run(inputs)]
    loss_r, grad_x_r, grad_w_r, ab_r, labels_r = per_replica

    # One replica on the global batch.
    w1 = tf.Variable(w_init)
    xg = tf.constant(x_global)
    with tf.GradientTape() as tape:
        tape.watch(xg)
        loss1, _, _ = losses.nt_xent_loss(
            _projected(xg, w1), temperature=tau, hidden_norm=norm
        )
    grad_xg, grad_w1 = (g.numpy() for g in tape.gradient(loss1, [xg, w1]))

    hidden_global = x_global @ w_init
    reference = np_nt_xent(hidden_global, tau, norm, num_replicas=2)
    global_n = 2 * n
    for r in range(2):
        want_loss, want_ab, want_labels = reference[r]
        np.testing.assert_allclose(loss_r[r].numpy(), want_loss, rtol=1e-5)
        np.testing.assert_allclose(
            ab_r[r].numpy(), want_ab, rtol=1e-5, atol=1e-4
        )
        np.testing.assert_array_equal(labels_r[r].numpy(), want_labels)
        # This replica's input gradient = the global gradient of its rows,
        # which includes what the other replica's loss sends back.
        rows = np.r_[
            r * n : (r + 1) * n, global_n + r * n : global_n + (r + 1) * n
        ]
        np.testing.assert_allclose(
            grad_x_r[r].numpy(), grad_xg[rows], rtol=1e-5, atol=1e-5
        )
    mean_loss = np.mean([t.numpy() for t in loss_r])
    np.testing.assert_allclose(mean_loss, loss1.numpy(), rtol=1e-5, atol=1e-5)
    summed_grad_w = sum(g.numpy() for g in grad_w_r)
    np.testing.assert_allclose(summed_grad_w, grad_w1, rtol=1e-5, atol=1e-5)


def test_cross_replica_concat_gradient_reaches_every_replica(strategy):
    # Replica r contributes x_r; the loss of replica r is
    # sum(c_r * concat(x_0, x_1)). d(sum of losses)/dx_k = c_0[k] + c_1[k].
    xs = [np.full((2, 3), 1.0 + r, np.float32) for r in range(2)]
    cs = [
        np.arange(12, dtype=np.float32).reshape(4, 3) * (r + 1)
        for r in range(2)
    ]
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: (
            tf.constant(xs[ctx.replica_id_in_sync_group]),
            tf.constant(cs[ctx.replica_id_in_sync_group]),
        )
    )

    def replica_step(x, c):
        ctx = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            tape.watch(x)
            gathered = losses.cross_replica_concat(x, ctx)
            loss = tf.reduce_sum(c * gathered)
        return gathered, tape.gradient(loss, x)

    gathered, grads = tf.function(lambda v: strategy.run(replica_step, args=v))(
        values
    )
    for r in range(2):
        np.testing.assert_array_equal(
            strategy.experimental_local_results(gathered)[r].numpy(),
            np.concatenate(xs),
        )
        want = cs[0][2 * r : 2 * r + 2] + cs[1][2 * r : 2 * r + 2]
        np.testing.assert_array_equal(
            strategy.experimental_local_results(grads)[r].numpy(), want
        )
