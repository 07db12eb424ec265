"""NT-Xent contrastive loss with cross-replica negatives; supervised and
distillation losses.

The contrastive loss follows SPEC.md §5 and `add_contrastive_loss` of the
reference (`tf2/objective.py`): every replica contrasts its own rows against
the hidden vectors of all replicas (2N - 2 negatives per row for a global
batch of N images), and the gather across replicas passes gradients back to
the replica that produced each row. All maths runs in float32 whatever the
encoder's compute dtype (float64 inputs stay float64, for gradient checks).
"""

from __future__ import annotations

import tensorflow as tf

# Subtracted from a row's similarity with itself so that softmax ignores it
# (LARGE_NUM of the reference).
LARGE_NUM = 1e9


def _at_least_float32(x: tf.Tensor) -> tf.Tensor:
    """Casts half-precision tensors to float32; keeps float32 and float64."""
    x = tf.convert_to_tensor(x)
    if x.dtype in (tf.float16, tf.bfloat16):
        return tf.cast(x, tf.float32)
    return x


def _num_replicas(replica_context: tf.distribute.ReplicaContext | None) -> int:
    if replica_context is None:
        return 1
    return replica_context.num_replicas_in_sync


def cross_replica_concat(
    tensor: tf.Tensor,
    replica_context: tf.distribute.ReplicaContext | None,
) -> tf.Tensor:
    """Concatenates `tensor` of every replica along axis 0, in replica order.

    Each replica scatters its rows into its own slot of a zero tensor of
    shape (num_replicas, *tensor.shape) and the slots are all-reduced with
    SUM, as in the reference. The gradient of an all-reduce SUM is an
    all-reduce SUM of the incoming gradients (`ReplicaContext.all_reduce`
    registers it), so every replica receives the gradient that all replicas'
    losses send to its rows. This works under MirroredStrategy,
    MultiWorkerMirroredStrategy and TPUStrategy alike.

    Args:
      tensor: (n, ...) rows of this replica; the same shape on every replica.
      replica_context: the context of the running replica
        (`tf.distribute.get_replica_context()` inside `strategy.run`), or
        None for a single replica.

    Returns:
      (num_replicas * n, ...) rows of replica 0, then replica 1, and so on;
      `tensor` itself when there is one replica.
    """
    num_replicas = _num_replicas(replica_context)
    if num_replicas == 1:
        return tensor
    with tf.name_scope("cross_replica_concat"):
        replica_id = replica_context.replica_id_in_sync_group
        # (num_replicas, n, ...), zero except this replica's slot.
        slots = tf.scatter_nd(
            indices=[[replica_id]],
            updates=tensor[tf.newaxis],
            shape=tf.concat([[num_replicas], tf.shape(tensor)], axis=0),
        )
        slots = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, slots)
        gathered = tf.reshape(
            slots, tf.concat([[-1], tf.shape(tensor)[1:]], axis=0)
        )
        static = tensor.shape
        if static.rank is not None and static[0] is not None:
            gathered.set_shape([num_replicas * static[0], *static[1:]])
        return gathered


def nt_xent_loss(
    hidden: tf.Tensor,
    *,
    temperature: float,
    hidden_norm: bool = True,
    replica_context: tf.distribute.ReplicaContext | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The NT-Xent loss of this replica's rows (SPEC.md §5).

    Args:
      hidden: (2n, d) projections of this replica, view-major: rows [0, n)
        are the first view of the n local images, rows [n, 2n) the second
        view of the same images. Half precision is cast to float32;
        float32 and float64 are kept (float64 serves gradient checks).
      temperature: softmax temperature tau (> 0).
      hidden_norm: l2-normalise each row first (cosine similarity).
      replica_context: the running replica's context for cross-replica
        negatives, or None for a single replica.

    Returns:
      loss: scalar (float32, or float64 for float64 input), the mean over
        the n local rows of loss_a + loss_b (the two directions are
        summed, as in the reference). It is not divided by the number of
        replicas; the train step does that before taking gradients,
        because gradients are summed across replicas.
      logits_ab: (n, N) similarities of the local first views with
        the second views of all N global images, for the metrics.
      labels: (n, 2N) one-hot targets; the positive of local row i
        is global column r * n + i, r = this replica's index.

    Raises:
      ValueError: `hidden` does not have an even number of rows.
    """
    hidden = _at_least_float32(hidden)
    if hidden.shape.rank != 2:
        raise ValueError(
            f"Received: hidden of shape {hidden.shape}. nt_xent_loss needs "
            "a (2 * batch, dim) matrix of projections."
        )
    rows = hidden.shape[0]
    if rows is not None and rows % 2:
        raise ValueError(
            f"Received: hidden with {rows} rows. nt_xent_loss needs an even "
            "number of rows: the two views of each image, view-major."
        )
    if hidden_norm:
        hidden = tf.math.l2_normalize(hidden, axis=-1)
    hidden1, hidden2 = tf.split(hidden, 2, axis=0)  # (n, d) each
    n = tf.shape(hidden1)[0]

    hidden1_all = cross_replica_concat(hidden1, replica_context)  # (N, d)
    hidden2_all = cross_replica_concat(hidden2, replica_context)  # (N, d)
    global_n = tf.shape(hidden1_all)[0]
    replica_id = 0
    if _num_replicas(replica_context) > 1:
        replica_id = replica_context.replica_id_in_sync_group
    # Global column of each local row's positive: r * n + i.
    positives = tf.cast(replica_id, tf.int32) * n + tf.range(n)  # (n,)
    labels = tf.one_hot(positives, 2 * global_n, dtype=hidden.dtype)
    masks = tf.one_hot(positives, global_n, dtype=hidden.dtype)  # (n, N)

    inv_tau = 1.0 / temperature
    logits_aa = tf.matmul(hidden1, hidden1_all, transpose_b=True) * inv_tau
    logits_aa -= masks * LARGE_NUM  # (n, N), own row excluded
    logits_bb = tf.matmul(hidden2, hidden2_all, transpose_b=True) * inv_tau
    logits_bb -= masks * LARGE_NUM
    logits_ab = tf.matmul(hidden1, hidden2_all, transpose_b=True) * inv_tau
    logits_ba = tf.matmul(hidden2, hidden1_all, transpose_b=True) * inv_tau

    loss_a = tf.nn.softmax_cross_entropy_with_logits(
        labels, tf.concat([logits_ab, logits_aa], axis=1)
    )  # (n,)
    loss_b = tf.nn.softmax_cross_entropy_with_logits(
        labels, tf.concat([logits_ba, logits_bb], axis=1)
    )  # (n,)
    loss = tf.reduce_mean(loss_a + loss_b)
    return loss, logits_ab, labels


def contrastive_metrics(
    logits_ab: tf.Tensor, labels: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Contrast accuracy and entropy of this replica's rows (SPEC.md §5).

    Args:
      logits_ab: (n, N) from `nt_xent_loss`.
      labels: (n, 2N) from `nt_xent_loss`.

    Returns:
      accuracy: fraction of rows whose largest logit is their positive.
      entropy: mean entropy of softmax(logits_ab) (natural log; the
        reference adds 1e-8 inside the log).
    """
    logits_ab = _at_least_float32(logits_ab)
    hits = tf.equal(tf.argmax(labels, axis=1), tf.argmax(logits_ab, axis=1))
    accuracy = tf.reduce_mean(tf.cast(hits, logits_ab.dtype))
    probs = tf.nn.softmax(logits_ab)
    entropy = -tf.reduce_mean(
        tf.reduce_sum(probs * tf.math.log(probs + 1e-8), axis=-1)
    )
    return accuracy, entropy


def supervised_loss(labels_one_hot: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean softmax cross-entropy of the supervised head, in >= float32.

    Args:
      labels_one_hot: (b, classes) one-hot (or soft) targets.
      logits: (b, classes) logits; half precision is cast to float32.

    Returns:
      Scalar mean over the b rows, float32 (float64 for float64 logits).
    """
    logits = _at_least_float32(logits)
    labels = tf.cast(labels_one_hot, logits.dtype)
    return tf.reduce_mean(
        tf.nn.softmax_cross_entropy_with_logits(labels, logits)
    )


def distillation_loss(
    teacher_logits: tf.Tensor,
    student_logits: tf.Tensor,
    temperature: float = 1.0,
) -> tf.Tensor:
    """SimCLRv2's distillation loss (arXiv:2006.10029, eq. 3), batch mean.

    `T^2 * CE(softmax(teacher / T), student / T)`: the cross-entropy of the
    student's temperature-scaled softmax against the teacher's soft labels.
    The T^2 factor (Hinton et al., 2015) keeps the gradient scale of the
    soft targets independent of T. The teacher receives no gradient.

    Args:
      teacher_logits: (b, classes) logits of the teacher.
      student_logits: (b, classes) logits of the student; half precision is
        cast to float32.
      temperature: T > 0; 1.0 is the paper's.

    Returns:
      Scalar mean over the b rows, float32 (float64 for float64 logits).
    """
    student = _at_least_float32(student_logits)
    teacher = tf.stop_gradient(tf.cast(teacher_logits, student.dtype))
    targets = tf.nn.softmax(teacher / temperature)
    per_row = tf.nn.softmax_cross_entropy_with_logits(
        targets, student / temperature
    )
    return temperature**2 * tf.reduce_mean(per_row)
