"""The one place that turns a run config into the SimCLR network and the
objective it trains with."""

from __future__ import annotations

import keras

from simclr_tf import config as config_lib
from simclr_tf import objective, optim
from simclr_tf.models import heads, resnet, simclr_model

PRETRAIN_VIEWS = 2

# The config fields that shape the network's variables: a checkpoint fits
# a run only where they agree; exports record them.
ARCHITECTURE_FIELDS = (
    "resnet_depth",
    "width_multiplier",
    "resnet_base_width",
    "sk_ratio",
    "se_ratio",
    "proj_head_mode",
    "proj_out_dim",
    "num_proj_layers",
)


def has_supervised_head(
    config: config_lib.Config, num_classes: int | None
) -> bool:
    """Whether the model gets a linear classifier (SPEC.md §4).

    Fine-tuning and distillation always have one (the student's has the
    teacher's classes); pretraining when `lineareval_while_pretraining`;
    never without classes (num_classes None).
    """
    if num_classes is None:
        return False
    return (
        config.train.train_mode != "pretrain"
        or config.train.lineareval_while_pretraining
    )


def build_model(
    config: config_lib.Config,
    num_classes: int | None,
    dtype_policy: str | None = None,
) -> simclr_model.SimCLRModel:
    """Builds (creates the variables of) the model a run config describes.

    The caller enters the strategy scope first.

    Args:
      config: the run config.
      num_classes: classes of the labelled dataset (when distilling: of
        the teacher); None for unlabelled data (no supervised head).
      dtype_policy: the Keras dtype policy of every layer ("float32",
        "mixed_bfloat16", "mixed_float16"); None keeps the global policy.

    The supervised head starts at zero when `zero_init_logits_layer` and
    the weights come from `--checkpoint` (which then does not restore the
    head); otherwise it gets the reference's RandomNormal(0.01) init.

    Returns:
      A built `SimCLRModel`: 2 views in pretraining, 1 in fine-tuning and
      distillation.

    Raises:
      ValueError: fine-tuning or distillation without classes.
    """
    m, t = config.model, config.train
    finetune = t.train_mode == "finetune"
    pretrain = t.train_mode == "pretrain"
    if not pretrain and num_classes is None:
        # Runs refuse unlabelled data before this (preflight); a caller
        # must pass the dataset's (or the teacher's) classes.
        raise ValueError(
            f"Received: num_classes=None with train_mode={t.train_mode}, "
            "whose supervised head needs the number of classes."
        )
    bn = dict(batch_norm_decay=m.batch_norm_decay, global_bn=m.global_bn)
    encoder = resnet.ResNet(
        depth=m.resnet_depth,
        width_multiplier=m.width_multiplier,
        cifar_stem=config_lib.use_cifar_stem(config.data.image_size),
        sk_ratio=m.sk_ratio,
        se_ratio=m.se_ratio,
        fine_tune_after_block=t.fine_tune_after_block if finetune else -1,
        base_width=m.resnet_base_width,
        zero_init_residual=m.zero_init_residual_bn,
        conv_backward=config.runtime.conv_backward,
        recompute_bn_relu=config.runtime.recompute_bn_relu,
        name="resnet",
        **bn,
    )
    projection_head = heads.ProjectionHead(
        mode=m.proj_head_mode,
        out_dim=m.proj_out_dim,
        num_layers=m.num_proj_layers,
        name="projection_head",
        **bn,
    )
    supervised_head = None
    if has_supervised_head(config, num_classes):
        supervised_head = heads.SupervisedHead(
            num_classes,
            # As the reference, the zero head replaces the one a
            # `--checkpoint` would bring; a fresh run keeps the normal init.
            zero_init=m.zero_init_logits_layer and bool(t.checkpoint),
            name="head_supervised",
        )
    num_views = PRETRAIN_VIEWS if pretrain else 1
    model = simclr_model.SimCLRModel(
        encoder,
        projection_head,
        supervised_head,
        ft_proj_selector=m.ft_proj_selector,
        num_views=num_views,
        stop_gradient_supervised=pretrain,
        name="simclr",
    )
    size = config.data.image_size
    model.build((None, size, size, simclr_model.IMAGE_CHANNELS * num_views))
    if dtype_policy is not None:
        _set_dtype_policy(model, dtype_policy)
    return model


def _set_dtype_policy(model: keras.Model, dtype_policy: str) -> None:
    """Gives every layer `dtype_policy`, leaving the global one alone.

    Keras layers take the global policy when constructed and do not pass
    their own to the layers they create; setting it on each layer of the
    built model is the same as building under that global policy (the
    variables are float32 under every policy used here).
    """
    # `_flatten_layers` is what Keras itself uses to walk nested layers.
    for layer in model._flatten_layers(include_self=True, recursive=True):
        layer.dtype_policy = dtype_policy


def build_objective(
    config: config_lib.Config,
    model: simclr_model.SimCLRModel,
    teacher=None,
    labelled: bool = False,
):
    """The objective a run config trains `model` with (built once).

    Pretraining: NT-Xent over the model's views (+ the linear head when
    the model has one); fine-tuning: the supervised head's cross-entropy;
    distillation: the teacher's soft labels (+ the labels' cross-entropy
    when `distill_alpha` < 1).

    Args:
      config: the run config (loss, optimizer and train mode).
      model: the built model; its weight groups give the decayed variables.
      teacher: distillation only: the loaded `teacher.Teacher`.
      labelled: distillation only: the training data has labels (then
        the supervised metrics are reported).

    Returns:
      An objective: `objective(outputs, labels, replica_context)`.
    """
    decayed = optim.decayed_variables(
        config.optim.optimizer, model.weight_groups, model.trainable_variables
    )
    weight_decay = config.optim.weight_decay
    t = config.train
    if t.train_mode == "finetune":
        return objective.SupervisedObjective(weight_decay, decayed)
    if t.train_mode == "distill":
        return objective.DistillationObjective(
            teacher,
            temperature=t.distill_temperature,
            alpha=t.distill_alpha,
            labelled=labelled,
            weight_decay=weight_decay,
            decayed_variables=decayed,
        )
    return objective.ContrastiveObjective(
        temperature=config.loss.temperature,
        hidden_norm=config.loss.hidden_norm,
        num_views=model.num_views,
        supervised=model.supervised_head is not None,
        weight_decay=weight_decay,
        decayed_variables=decayed,
    )
