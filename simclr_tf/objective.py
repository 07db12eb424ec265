"""The run's objective: which losses a step adds up, and their metrics.

An objective is built once (`models.factory.build_objective`) from plain
values and called inside the replica step:

    total_loss, metrics = objective(outputs, labels, replica_context)

`outputs` is the model's output dict, `labels` the (n, num_classes)
one-hot labels of the local batch. The total is not yet divided by the
number of replicas (the step does that). Every objective names the model
outputs it reads (`output_keys`, the only ones gradient caching keeps
whole) and the metrics it returns (`metric_names`, a fixed order; the
TensorBoard names of SPEC.md §7 without "train/").

An objective may also name training-health monitors (`monitor_names`,
computed by `monitors(outputs)` under a stop-gradient): the step computes
them on the last step of each loop call only (an SVD is too costly for
every step), and the loop reports that step's values.

An objective may also need inputs the model does not produce: before the
forward pass the step calls `objective.targets(images)` (outside the
gradient tape, on the whole local batch) and adds the returned tensors to
`outputs` (`{}` for all but distillation, whose teacher logits arrive as
`outputs["teacher_logits"]`; gradient caching passes them through whole).

Three objectives exist: `ContrastiveObjective` (pretraining: NT-Xent, plus
the linear head's cross-entropy when the model has one),
`SupervisedObjective` (fine-tuning) and `DistillationObjective` (SimCLRv2
distillation from a teacher). A new objective is one more class here with
the same members, chosen in `models.factory.build_objective`.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from simclr_tf import health, losses

CONTRASTIVE_METRICS = ("contrast_loss", "contrast_acc", "contrast_entropy")
SUPERVISED_METRICS = ("supervised_loss", "supervised_acc")
DISTILL_METRICS = ("distill_loss", "teacher_agreement")
TEACHER_LOGITS = "teacher_logits"
TOTAL_METRICS = ("weight_decay", "total_loss")
# Collapse monitors of pretraining (`simclr_tf.health`): the projections'
# per-dimension std and the encoder features' effective rank.
HEALTH_METRICS = ("proj_std", "rankme")


def weight_decay_loss(variables: Sequence, weight_decay: float) -> tf.Tensor:
    """weight_decay * sum(||w||^2 / 2) over `variables`.

    Args:
      variables: the decayed variables (`optim.decayed_variables`).
      weight_decay: the coefficient.

    Returns:
      Scalar float32 (0 when there is nothing to decay).
    """
    if not variables or not weight_decay:
        return tf.constant(0.0)
    total = tf.add_n([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in variables])
    return weight_decay * total


def _supervised_terms(
    labels: tf.Tensor, logits: tf.Tensor
) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """Cross-entropy of the linear head and its accuracy."""
    loss = losses.supervised_loss(labels, logits)
    correct = tf.equal(tf.argmax(labels, axis=1), tf.argmax(logits, axis=1))
    return loss, {
        "supervised_loss": loss,
        "supervised_acc": tf.reduce_mean(tf.cast(correct, tf.float32)),
    }


class _DecayedObjective:
    """Shared by the objectives: the supervised head and weight decay.

    Args:
      supervised: whether the model has a supervised head (`logits_sup`).
      weight_decay: the coefficient of the loss's weight-decay term.
      decayed_variables: the variables that term covers.
    """

    _own_keys: tuple[str, ...] = ()
    _own_metrics: tuple[str, ...] = ()
    _monitor_keys: tuple[str, ...] = ()
    _monitor_names: tuple[str, ...] = ()

    def __init__(
        self,
        supervised: bool,
        weight_decay: float,
        decayed_variables: Sequence,
    ):
        self.supervised = bool(supervised)
        self.weight_decay = weight_decay
        self.decayed_variables = list(decayed_variables)

    @property
    def output_keys(self) -> list[str]:
        """The model outputs the loss reads."""
        sup = ["logits_sup"] if self.supervised else []
        return [*self._own_keys, *sup, *self._monitor_keys]

    @property
    def monitor_names(self) -> list[str]:
        """The monitors `monitors` returns (none by default)."""
        return list(self._monitor_names)

    def monitors(self, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """{monitor name: float32 scalar} of one replica's outputs."""
        del outputs
        return {}

    @property
    def metric_names(self) -> list[str]:
        """The metrics `__call__` returns, in a fixed order."""
        sup = SUPERVISED_METRICS if self.supervised else ()
        return [*self._own_metrics, *sup, *TOTAL_METRICS]

    def targets(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        """Extra loss inputs computed from the local batch (none here)."""
        del images
        return {}

    def _finish(self, total, metrics, outputs, sup_labels):
        """Adds the supervised term and the weight decay to `total`."""
        if self.supervised:
            sup_loss, sup_metrics = _supervised_terms(
                sup_labels, outputs["logits_sup"]
            )
            metrics.update(sup_metrics)
            total += sup_loss
        decay = weight_decay_loss(self.decayed_variables, self.weight_decay)
        total += decay
        metrics.update(weight_decay=decay, total_loss=total)
        return total, metrics


class ContrastiveObjective(_DecayedObjective):
    """Pretraining: NT-Xent over the views, plus the linear head if any.

    Args:
      temperature: the NT-Xent temperature tau.
      hidden_norm: L2-normalise the projections before the similarities.
      num_views: views per example; the linear head sees every view, so
        its labels are repeated `num_views` times.
      supervised: the model has a supervised head (linear evaluation
        while pretraining, behind a stop-gradient).
      weight_decay: the coefficient of the loss's weight-decay term.
      decayed_variables: the variables that term covers.
    """

    _own_keys = ("proj_head_output",)
    _own_metrics = CONTRASTIVE_METRICS
    _monitor_keys = ("proj_head_input",)
    _monitor_names = HEALTH_METRICS

    def __init__(
        self,
        temperature: float,
        hidden_norm: bool,
        num_views: int,
        supervised: bool,
        weight_decay: float,
        decayed_variables: Sequence,
    ):
        super().__init__(supervised, weight_decay, decayed_variables)
        self.temperature = temperature
        self.hidden_norm = hidden_norm
        self.num_views = num_views

    def __call__(
        self,
        outputs: dict[str, tf.Tensor],
        labels: tf.Tensor,
        replica_context: tf.distribute.ReplicaContext,
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """(total loss of one replica, {metric name: scalar})."""
        loss, logits_ab, con_labels = losses.nt_xent_loss(
            outputs["proj_head_output"],
            temperature=self.temperature,
            hidden_norm=self.hidden_norm,
            replica_context=replica_context,
        )
        acc, entropy = losses.contrastive_metrics(logits_ab, con_labels)
        metrics = dict(
            contrast_loss=loss, contrast_acc=acc, contrast_entropy=entropy
        )
        total = tf.constant(0.0)
        total += loss
        # The linear head sees every view: (v * n, classes) labels.
        sup_labels = tf.concat([labels] * self.num_views, axis=0)
        return self._finish(total, metrics, outputs, sup_labels)

    def monitors(self, outputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """`proj_std` of the projections (v * n, d) and `rankme` of the
        encoder features (v * n, feature_dim) of this replica's batch."""
        return {
            "proj_std": health.projection_std(
                tf.stop_gradient(outputs["proj_head_output"])
            ),
            "rankme": health.rankme(
                tf.stop_gradient(outputs["proj_head_input"])
            ),
        }


class SupervisedObjective(_DecayedObjective):
    """Fine-tuning: cross-entropy of the supervised head.

    Args:
      weight_decay: the coefficient of the loss's weight-decay term.
      decayed_variables: the variables that term covers.
    """

    def __init__(self, weight_decay: float, decayed_variables: Sequence):
        super().__init__(True, weight_decay, decayed_variables)

    def __call__(
        self,
        outputs: dict[str, tf.Tensor],
        labels: tf.Tensor,
        replica_context: tf.distribute.ReplicaContext,
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """(total loss of one replica, {metric name: scalar})."""
        del replica_context  # No cross-replica term.
        return self._finish(tf.constant(0.0), {}, outputs, labels)


class DistillationObjective(_DecayedObjective):
    """SimCLRv2 distillation: the student learns a teacher's soft labels.

    total = alpha * T^2 * CE(softmax(teacher / T), student / T)
            + (1 - alpha) * CE(labels, student) + weight decay

    (arXiv:2006.10029, eq. 3 for alpha = 1, the paper's setting; the
    labelled term is its "combined with ground-truth labels" variant). The
    teacher sees the student's augmented view; its logits come from
    `targets` in float32 and receive no gradient. An unlabelled example of
    a labelled source (all-zero one-hot) adds 0 to the labelled term.

    Args:
      teacher: `teacher(images) -> (n, classes)` float32 logits, run in
        inference mode (`simclr_tf.teacher.Teacher`).
      temperature: T > 0 of the distillation term.
      alpha: weight of the distillation term, in [0, 1].
      labelled: the training data has labels: the supervised metrics are
        reported (and the labelled term is used when alpha < 1).
      weight_decay: the coefficient of the loss's weight-decay term.
      decayed_variables: the variables that term covers.

    Raises:
      ValueError: alpha < 1 without labels, alpha outside [0, 1] or
        temperature <= 0.
    """

    _own_metrics = DISTILL_METRICS

    def __init__(
        self,
        teacher,
        temperature: float,
        alpha: float,
        labelled: bool,
        weight_decay: float,
        decayed_variables: Sequence,
    ):
        if not 0.0 <= alpha <= 1.0 or temperature <= 0:
            raise ValueError(
                f"Received: distill_alpha={alpha}, distill_temperature="
                f"{temperature}. Use alpha in [0, 1] and temperature > 0."
            )
        if alpha < 1.0 and not labelled:
            raise ValueError(
                f"Received: distill_alpha={alpha} on data without labels. "
                "The labelled term needs labels: use --distill_alpha=1."
            )
        super().__init__(labelled, weight_decay, decayed_variables)
        self.teacher = teacher
        self.temperature = temperature
        self.alpha = alpha

    @property
    def output_keys(self) -> list[str]:
        """The model outputs the loss reads: the student's logits."""
        return ["logits_sup"]

    def targets(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        """{"teacher_logits": (n, classes) float32}, no gradient."""
        return {TEACHER_LOGITS: tf.stop_gradient(self.teacher(images))}

    def __call__(
        self,
        outputs: dict[str, tf.Tensor],
        labels: tf.Tensor,
        replica_context: tf.distribute.ReplicaContext,
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """(total loss of one replica, {metric name: scalar})."""
        del replica_context  # Per-example losses: no cross-replica term.
        student = outputs["logits_sup"]  # (n, classes)
        teacher = outputs[TEACHER_LOGITS]  # (n, classes) float32
        distill = losses.distillation_loss(teacher, student, self.temperature)
        agree = tf.equal(tf.argmax(student, axis=1), tf.argmax(teacher, axis=1))
        metrics = {
            "distill_loss": distill,
            "teacher_agreement": tf.reduce_mean(tf.cast(agree, tf.float32)),
        }
        total = self.alpha * distill
        if self.supervised:
            sup_loss, sup_metrics = _supervised_terms(labels, student)
            metrics.update(sup_metrics)
            if self.alpha < 1.0:
                total += (1.0 - self.alpha) * sup_loss
        decay = weight_decay_loss(self.decayed_variables, self.weight_decay)
        total += decay
        metrics.update(weight_decay=decay, total_loss=total)
        return total, metrics
