"""Converts a reference SimCLR TF2 checkpoint or SavedModel into a run dir.

The output directory is one of our run directories: `config.json` and
`flags.cfg` with the inferred architecture, our checkpoint `ckpt-<step>`
(weights only) and our SavedModel export `saved_model/<step>/`
(`serving_default` for TF Serving, `__call__` for `hub.KerasLayer`).
Used by `scripts/convert_checkpoint.py`.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf import export, interop, interop_arch
from simclr_tf import run_info as run_info_lib
from simclr_tf.models import factory

# Image sizes written to the config: the reference eval sizes.
CIFAR_IMAGE_SIZE = 32
IMAGENET_IMAGE_SIZE = 224


def config_for(
    arch: interop_arch.Architecture,
    image_size: int | None = None,
    ft_proj_selector: int = 0,
) -> config_lib.Config:
    """The run config of a model with the source's architecture."""
    if image_size is None:
        image_size = (
            CIFAR_IMAGE_SIZE if arch.cifar_stem else IMAGENET_IMAGE_SIZE
        )
    mode = arch.proj_head_mode
    values = dict(
        resnet_depth=arch.resnet_depth,
        width_multiplier=arch.width_multiplier,
        resnet_base_width=arch.resnet_base_width,
        sk_ratio=arch.sk_ratio,
        se_ratio=arch.se_ratio,
        global_bn=arch.global_bn,
        proj_head_mode=mode,
        num_proj_layers=arch.num_proj_layers,
        proj_out_dim=arch.proj_out_dim or 128,
        ft_proj_selector=ft_proj_selector if mode != "none" else 0,
        image_size=image_size,
        train_mode="finetune" if arch.num_classes else "pretrain",
        lineareval_while_pretraining=False,
    )
    return config_lib.from_flat(values)


def convert(
    source_path: str,
    output_dir: str,
    image_size: int | None = None,
    ft_proj_selector: int = 0,
) -> tuple[interop.Source, interop_arch.Architecture, str]:
    """Writes `output_dir` from a reference source.

    Returns:
      (the source, its architecture, the export directory).

    Raises:
      interop.SourceError: an unusable source or an existing output.
    """
    if tf.io.gfile.exists(output_dir) and tf.io.gfile.listdir(output_dir):
        raise interop.SourceError(
            f"Received: output_dir={output_dir!r}, which is not empty. "
            "Choose a new directory."
        )
    source = interop.detect(source_path)
    if source.kind == interop.OURS:
        raise interop.SourceError(
            f"Received: source={source_path!r}, already one of our "
            "checkpoints. Use scripts/export_saved_model.py to export it."
        )
    arch = interop.infer_architecture(source)
    config = config_for(arch, image_size, ft_proj_selector)
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, model_dir=output_dir)
    )
    model = factory.build_model(
        config, arch.num_classes, dtype_policy="float32"
    )
    interop.check_config(config, source, arch.num_classes)
    interop.restore(model, config, source)
    step = source.step or 0
    config_lib.write_json(config, output_dir)
    # What a run would have found out; the source knows no dataset sizes.
    run_info_lib.write(
        run_info_lib.RunInfo(
            num_classes=arch.num_classes,
            class_names=None,
            num_train_examples=0,
            num_eval_examples=0,
            dtype_policy="float32",
            total_steps=step,
        ),
        output_dir,
    )
    # As run.py writes it, without importing cli (whose absl flags would
    # clash with those of convert_checkpoint.py and benchmark.py).
    config_lib.write_flags_file(config, output_dir)
    # A CheckpointManager save, so that `--checkpoint=<output_dir>` finds it.
    tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model), output_dir, max_to_keep=1
    ).save(checkpoint_number=step)
    export_dir = export.export_saved_model(
        model,
        os.path.join(output_dir, "saved_model", str(step)),
        image_size=config.data.image_size,
        metadata=export.run_metadata(config, step),
    )
    return source, arch, export_dir
