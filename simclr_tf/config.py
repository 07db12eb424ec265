"""Typed, frozen run configuration, its validation and derived values.

Field names equal the command-line flag names (SPEC.md §1), so that
`cli.config_from_flags` can fill every group by name and a config can be
written back as a replayable flag file. This module must not import
TensorFlow: configs are validated before any TensorFlow work starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

MODES = ("train", "eval", "train_then_eval")
TRAIN_MODES = ("pretrain", "finetune")
OPTIMIZERS = ("momentum", "adam", "lars")
LR_SCALINGS = ("linear", "sqrt")
PROJ_HEAD_MODES = ("none", "linear", "nonlinear")
RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)
COLOR_JITTER_IMPLS = ("v1", "v2")
MIXED_PRECISIONS = ("auto", "none", "bfloat16", "float16")
CONV_BACKWARDS = ("auto", "tf", "matmul")

# Prefix of `--dataset` that selects an image folder instead of TFDS.
FOLDER_PREFIX = "folder:"


class ConfigError(ValueError):
    """A flag value (or combination of values) that cannot be run."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are augmented (SPEC.md §2)."""

    dataset: str = "imagenet2012"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    cache_dataset: bool = False
    image_size: int = 224
    color_jitter_strength: float = 1.0
    color_jitter_impl: str = "v2"
    use_blur: bool = True
    min_crop_area: float = 0.08
    use_flip: bool = True
    holdout_fraction: float = 0.0
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Encoder and heads (SPEC.md §3-4)."""

    resnet_depth: int = 50
    width_multiplier: int = 1
    resnet_base_width: int = 64
    zero_init_residual_bn: bool = True
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    batch_norm_decay: float = 0.9
    global_bn: bool = True
    proj_head_mode: str = "nonlinear"
    proj_out_dim: int = 128
    num_proj_layers: int = 3
    ft_proj_selector: int = 0
    zero_init_logits_layer: bool = False


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """NT-Xent contrastive loss (SPEC.md §5)."""

    temperature: float = 0.1
    hidden_norm: bool = True


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser, weight decay and learning-rate schedule (SPEC.md §6)."""

    optimizer: str = "lars"
    learning_rate: float = 0.3
    learning_rate_scaling: str = "linear"
    momentum: float = 0.9
    weight_decay: float = 1e-6
    warmup_epochs: float = 10.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to run, for how long, and where to keep its state (SPEC.md §7)."""

    mode: str = "train"
    train_mode: str = "pretrain"
    lineareval_while_pretraining: bool = True
    fine_tune_after_block: int = -1
    train_batch_size: int = 512
    train_epochs: int = 100
    train_steps: int = 0
    steps_per_loop: int = 1
    grad_cache_chunk_size: int = 0
    checkpoint_epochs: int = 1
    checkpoint_steps: int = 0
    keep_checkpoint_max: int = 5
    keep_hub_module_max: int = 1
    checkpoint: str | None = None
    model_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Linear-head evaluation and the kNN monitor."""

    eval_batch_size: int = 256
    eval_steps: int = 0
    eval_name: str | None = None
    knn_k: int = 200
    knn_temperature: float = 0.07
    knn_train_examples: int = 10000


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Hardware, distribution and numerics of the run."""

    use_tpu: bool = False
    tpu_name: str | None = None
    tpu_zone: str | None = None
    gcp_project: str | None = None
    master: str | None = None
    mixed_precision: str = "auto"
    jit_compile: bool = False
    cpu_replicas: int = 0
    conv_backward: str = "auto"
    recompute_bn_relu: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run configuration, grouped by concern."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()


# Group name in `Config` -> its dataclass, in definition order.
GROUPS: dict[str, type] = {
    f.name: f.default.__class__ for f in dataclasses.fields(Config)
}


def field_names() -> list[str]:
    """Every leaf field name (= flag name) of `Config`, in definition order."""
    return [
        f.name for group in GROUPS.values() for f in dataclasses.fields(group)
    ]


def from_flat(values: dict[str, Any]) -> Config:
    """Builds a `Config` from a flat {flag_name: value} mapping.

    Names missing from `values` keep their defaults; unknown names raise.

    Raises:
      ConfigError: a name that is not a config field.
    """
    unknown = set(values) - set(field_names())
    if unknown:
        raise ConfigError(f"Unknown config fields: {sorted(unknown)}.")
    groups = {
        name: cls(
            **{
                f.name: values[f.name]
                for f in dataclasses.fields(cls)
                if f.name in values
            }
        )
        for name, cls in GROUPS.items()
    }
    return Config(**groups)


def to_flat(config: Config) -> dict[str, Any]:
    """The inverse of `from_flat`: {flag_name: value} for every field."""
    flat = {}
    for name in GROUPS:
        flat.update(dataclasses.asdict(getattr(config, name)))
    return flat


def write_json(config: Config, model_dir: str) -> str:
    """Writes the resolved config to `model_dir/config.json`; returns the
    path. Checkpoint compatibility checks and exports read it back."""
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "config.json")
    with open(path, "w") as f:
        json.dump(to_flat(config), f, indent=2, sort_keys=True)
        f.write("\n")
    return path


# --------------------------------------------------------------------------
# Validation.


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_enum(name: str, value: Any, allowed: tuple) -> None:
    _check(
        value in allowed,
        f"Received: {name}={value!r}. "
        f"Use one of {', '.join(map(str, allowed))}.",
    )


def _check_positive(names_values: dict[str, float]) -> None:
    for name, value in names_values.items():
        _check(
            value > 0,
            f"Received: {name}={value}. --{name} must be a positive number.",
        )


def num_proj_hiddens(model: ModelConfig) -> int:
    """Number of projection-head layers L (the head keeps L + 1 tensors)."""
    return {
        "none": 0,
        "linear": 1,
        "nonlinear": model.num_proj_layers,
    }[model.proj_head_mode]


def validate(config: Config) -> Config:
    """Checks every value a user can get wrong; returns the config unchanged.

    Raises:
      ConfigError: with one line naming the bad value and the fix.
    """
    d, m, lo, o, t, e, r = (
        config.data,
        config.model,
        config.loss,
        config.optim,
        config.train,
        config.eval,
        config.runtime,
    )
    _check_enum("mode", t.mode, MODES)
    _check_enum("train_mode", t.train_mode, TRAIN_MODES)
    _check_enum("optimizer", o.optimizer, OPTIMIZERS)
    _check_enum("learning_rate_scaling", o.learning_rate_scaling, LR_SCALINGS)
    _check_enum("proj_head_mode", m.proj_head_mode, PROJ_HEAD_MODES)
    _check_enum("resnet_depth", m.resnet_depth, RESNET_DEPTHS)
    _check_enum("color_jitter_impl", d.color_jitter_impl, COLOR_JITTER_IMPLS)
    _check_enum("mixed_precision", r.mixed_precision, MIXED_PRECISIONS)
    _check_enum("conv_backward", r.conv_backward, CONV_BACKWARDS)
    _check(
        not (t.train_mode == "pretrain" and t.fine_tune_after_block > -1),
        f"Received: fine_tune_after_block={t.fine_tune_after_block} with "
        "train_mode=pretrain. Freezing applies to fine-tuning only: use "
        "--train_mode=finetune or --fine_tune_after_block=-1.",
    )
    _check(
        -1 <= t.fine_tune_after_block <= 4,
        f"Received: fine_tune_after_block={t.fine_tune_after_block}. Use -1 "
        "(train everything) to 4 (freeze the whole encoder).",
    )
    _check(
        not (m.proj_head_mode == "nonlinear" and m.num_proj_layers < 1),
        f"Received: num_proj_layers={m.num_proj_layers} with "
        "proj_head_mode=nonlinear. Use --num_proj_layers >= 1 or "
        "--proj_head_mode=none.",
    )
    n_hidden = num_proj_hiddens(m)
    _check(
        -(n_hidden + 1) <= m.ft_proj_selector <= n_hidden,
        f"Received: ft_proj_selector={m.ft_proj_selector}, but the "
        f"{m.proj_head_mode} projection head has {n_hidden} layers. Use a "
        f"value in [{-(n_hidden + 1)}, {n_hidden}] (0 = encoder output, "
        "-1 = last head layer).",
    )
    _check(
        m.resnet_base_width >= 2 and m.resnet_base_width % 2 == 0,
        f"Received: resnet_base_width={m.resnet_base_width}. Use an even "
        "number >= 2 (64 is the reference ResNet; 32 is half width).",
    )
    _check_positive(
        {
            "temperature": lo.temperature,
            "train_batch_size": t.train_batch_size,
            "eval_batch_size": e.eval_batch_size,
            "proj_out_dim": m.proj_out_dim,
            "width_multiplier": m.width_multiplier,
            "steps_per_loop": t.steps_per_loop,
            "keep_checkpoint_max": t.keep_checkpoint_max,
            "knn_temperature": e.knn_temperature,
        }
    )
    for name, value in {
        "train_steps": t.train_steps,
        "train_epochs": t.train_epochs,
        "eval_steps": e.eval_steps,
        "checkpoint_steps": t.checkpoint_steps,
        "checkpoint_epochs": t.checkpoint_epochs,
        "warmup_epochs": o.warmup_epochs,
        "grad_cache_chunk_size": t.grad_cache_chunk_size,
        "weight_decay": o.weight_decay,
        "learning_rate": o.learning_rate,
        "keep_hub_module_max": t.keep_hub_module_max,
        "knn_k": e.knn_k,
        "knn_train_examples": e.knn_train_examples,
        "cpu_replicas": r.cpu_replicas,
    }.items():
        _check(
            value >= 0,
            f"Received: {name}={value}. --{name} must be >= 0.",
        )
    _check(
        t.train_steps > 0 or t.train_epochs > 0,
        "Received: train_steps=0 and train_epochs=0. Set a positive "
        "--train_steps or --train_epochs.",
    )
    _check(
        d.image_size >= 8,
        f"Received: image_size={d.image_size}. Use --image_size >= 8 "
        "(32 for CIFAR, 224 for ImageNet).",
    )
    for name, value in (("sk_ratio", m.sk_ratio), ("se_ratio", m.se_ratio)):
        _check(
            0.0 <= value < 1.0,
            f"Received: {name}={value}. --{name} must be in [0, 1) "
            "(0 = off; 0.0625 is the SimCLRv2 value for sk_ratio).",
        )
    _check(
        0.0 < d.min_crop_area <= 1.0,
        f"Received: min_crop_area={d.min_crop_area}. Use a fraction in "
        "(0, 1] (the paper uses 0.08).",
    )
    _check(
        0.0 <= d.holdout_fraction < 1.0,
        f"Received: holdout_fraction={d.holdout_fraction}. Use a fraction "
        "in [0, 1).",
    )
    _check(
        0.0 <= d.color_jitter_strength,
        f"Received: color_jitter_strength={d.color_jitter_strength}. Use a "
        "value >= 0 (0 turns colour distortion off).",
    )
    _check(
        0.0 <= o.momentum < 1.0,
        f"Received: momentum={o.momentum}. Use a value in [0, 1).",
    )
    _check(
        0.0 < m.batch_norm_decay < 1.0,
        f"Received: batch_norm_decay={m.batch_norm_decay}. Use a value in "
        "(0, 1), e.g. 0.9.",
    )
    _check(
        not (
            d.dataset.startswith(FOLDER_PREFIX)
            and not d.dataset[len(FOLDER_PREFIX) :]
        ),
        f"Received: dataset={d.dataset!r}. Give the folder path after "
        f"'{FOLDER_PREFIX}', e.g. --dataset={FOLDER_PREFIX}/data/my_images.",
    )
    return config


# --------------------------------------------------------------------------
# Derived values: pure functions of the config, never written back.


def use_cifar_stem(image_size: int) -> bool:
    """The 3x3 stride-1 stem without max-pool is used for images <= 32."""
    return image_size <= 32


def scaled_learning_rate(optim: OptimConfig, global_batch: int) -> float:
    """The peak learning rate after batch-size scaling (SPEC.md §6)."""
    if optim.learning_rate_scaling == "linear":
        return optim.learning_rate * global_batch / 256.0
    if optim.learning_rate_scaling == "sqrt":
        return optim.learning_rate * math.sqrt(global_batch)
    raise ConfigError(
        f"Received: learning_rate_scaling={optim.learning_rate_scaling!r}. "
        f"Use one of {', '.join(LR_SCALINGS)}."
    )


def total_train_steps(train: TrainConfig, num_examples: int) -> int:
    """`train_steps`, or epochs converted to steps as the reference does."""
    if train.train_steps:
        return train.train_steps
    return num_examples * train.train_epochs // train.train_batch_size + 1


def warmup_steps(
    optim: OptimConfig, num_examples: int, global_batch: int
) -> int:
    """round(warmup_epochs * num_examples // B), as in the reference."""
    return int(round(optim.warmup_epochs * num_examples // global_batch))


def checkpoint_every(train: TrainConfig, num_examples: int) -> int:
    """Steps between checkpoints: `checkpoint_steps`, else from epochs."""
    if train.checkpoint_steps:
        return train.checkpoint_steps
    steps_per_epoch = max(1, num_examples // train.train_batch_size)
    return max(1, train.checkpoint_epochs * steps_per_epoch)
