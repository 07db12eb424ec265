"""The one place that turns a run config into the SimCLR network."""

from __future__ import annotations

from simclr_tf import config as config_lib
from simclr_tf.models import heads, resnet, simclr_model

PRETRAIN_VIEWS = 2


def has_supervised_head(
    config: config_lib.Config, num_classes: int | None
) -> bool:
    """Whether the model gets a linear classifier (SPEC.md §4).

    Fine-tuning always has one; pretraining when
    `lineareval_while_pretraining`; never without labels (num_classes None).
    """
    if num_classes is None:
        return False
    return (
        config.train.train_mode == "finetune"
        or config.train.lineareval_while_pretraining
    )


def build_model(
    config: config_lib.Config, num_classes: int | None
) -> simclr_model.SimCLRModel:
    """Builds (creates the variables of) the model a run config describes.

    Layers follow the global Keras dtype policy in force when this is
    called; the caller sets it (and enters the strategy scope) first.

    Args:
      config: the run config.
      num_classes: classes of the labelled dataset; None for unlabelled
        data (no supervised head).

    Returns:
      A built `SimCLRModel`: 2 views in pretraining, 1 in fine-tuning.

    Raises:
      ValueError: fine-tuning without labels.
    """
    m, t = config.model, config.train
    finetune = t.train_mode == "finetune"
    if finetune and num_classes is None:
        raise ValueError(
            f"Received: train_mode=finetune on dataset {config.data.dataset!r}"
            ", which has no labels. Fine-tune on a labelled dataset or use "
            "--train_mode=pretrain."
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
            zero_init=finetune and m.zero_init_logits_layer,
            name="head_supervised",
        )
    num_views = 1 if finetune else PRETRAIN_VIEWS
    model = simclr_model.SimCLRModel(
        encoder,
        projection_head,
        supervised_head,
        ft_proj_selector=m.ft_proj_selector,
        num_views=num_views,
        stop_gradient_supervised=not finetune,
        name="simclr",
    )
    size = config.data.image_size
    model.build((None, size, size, simclr_model.IMAGE_CHANNELS * num_views))
    return model
