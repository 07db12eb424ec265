"""Typed, frozen run configuration, valid by construction.

Field names equal the command-line flag names (SPEC.md §1), and each field
carries its flag's default and help text (`field.metadata["help"]`, plus
`"choices"` for enumerations): `cli` defines the flags from the fields, so
that a default or a help text lives in one place. Every group checks its
values when it is constructed (`__post_init__`), so an invalid `Config`
cannot exist: `dataclasses.replace` and `from_flat` raise `ConfigError`
with one line naming the value and the fix. This module must not import
TensorFlow: configs are checked before any TensorFlow work starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

MODES = ("train", "eval", "train_then_eval")
TRAIN_MODES = ("pretrain", "finetune", "distill")
OPTIMIZERS = ("momentum", "adam", "lars")
LR_SCALINGS = ("linear", "sqrt")
# Equal to `models.heads.PROJ_HEAD_MODES` and the depths of
# `models.resnet.BLOCKS` (tied by tests/config_test.py; this module cannot
# import the Keras layers).
PROJ_HEAD_MODES = ("none", "linear", "nonlinear")
RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)
COLOR_JITTER_IMPLS = ("v1", "v2")
MIXED_PRECISIONS = ("auto", "none", "bfloat16", "float16")
CONV_BACKWARDS = ("auto", "tf", "matmul")

# Prefix of `--dataset` that selects an image folder instead of TFDS.
FOLDER_PREFIX = "folder:"


class ConfigError(ValueError):
    """A flag value (or combination of values) that cannot be run."""


def _field(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field that is also a flag: its default and help, once.

    Args:
      default: the flag's and the field's default.
      help: the flag's help text.
      choices: the allowed values, checked when the group is constructed;
        a string field with choices is an enum flag.
    """
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------
# Checks, run by each group's __post_init__.


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choices(group: Any) -> None:
    """Each field with `choices` metadata holds one of them."""
    for f in dataclasses.fields(group):
        allowed = f.metadata.get("choices")
        value = getattr(group, f.name)
        _check(
            allowed is None or value in allowed,
            f"Received: {f.name}={value!r}. "
            f"Use one of {', '.join(map(str, allowed or ()))}.",
        )


def _check_positive(group: Any, *names: str) -> None:
    for name in names:
        value = getattr(group, name)
        _check(
            value > 0,
            f"Received: {name}={value}. --{name} must be a positive number.",
        )


def _check_non_negative(group: Any, *names: str) -> None:
    for name in names:
        value = getattr(group, name)
        _check(value >= 0, f"Received: {name}={value}. --{name} must be >= 0.")


def num_proj_hiddens(model: ModelConfig) -> int:
    """Number of projection-head layers L (the head keeps L + 1 tensors)."""
    return {
        "none": 0,
        "linear": 1,
        "nonlinear": model.num_proj_layers,
    }[model.proj_head_mode]


# --------------------------------------------------------------------------
# The groups.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are augmented (SPEC.md §2)."""

    dataset: str = _field(
        "imagenet2012",
        "A TFDS dataset name (e.g. cifar10, imagenet2012, "
        "imagenet2012_subset/1pct), or 'folder:/path' for a folder of images "
        "(class subfolders, optionally inside split folders such as train/ "
        "and val/; or a flat folder of unlabeled images for pretraining).",
    )
    data_dir: str | None = _field(None, "TFDS data directory.")
    train_split: str = _field("train", "Dataset split to train on.")
    eval_split: str = _field("validation", "Dataset split to evaluate.")
    cache_dataset: bool = _field(
        False, "Cache the decoded dataset in memory (small datasets only)."
    )
    image_size: int = _field(224, "Side in pixels of the square network input.")
    color_jitter_strength: float = _field(
        1.0, "Colour distortion strength s (0 turns it off)."
    )
    color_jitter_impl: str = _field(
        "v2",
        "Brightness form of the colour jitter: v2 multiplies by "
        "U(1 - 0.8s, 1 + 0.8s), v1 adds U(-0.8s, 0.8s).",
        COLOR_JITTER_IMPLS,
    )
    use_blur: bool = _field(
        True, "Gaussian blur in the pretraining augmentation."
    )
    min_crop_area: float = _field(
        0.08, "Smallest fraction of the image area a random crop keeps."
    )
    use_flip: bool = _field(True, "Random horizontal flips in training views.")
    holdout_fraction: float = _field(
        0.0,
        "Image folders without an eval-split subfolder: fraction of the "
        "training images held out (deterministically) as the eval split.",
    )
    seed: int | None = _field(
        None,
        "Seed for initialisation, shuffling and augmentation; unset means a "
        "fresh random run.",
    )
    label_fraction: float = _field(
        1.0,
        "Fine-tuning: train on this class-balanced fraction of the train "
        "split's labelled examples (every class keeps round(fraction x its "
        "size), at least 1), drawn with --seed (0 when unset); 1 = all.",
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(
            0.0 < self.label_fraction <= 1.0,
            f"Received: label_fraction={self.label_fraction}. Use a "
            "fraction in (0, 1] (e.g. 0.1 for 10 % of the labels; 1 = all).",
        )
        _check(
            self.image_size >= 8,
            f"Received: image_size={self.image_size}. Use --image_size >= 8 "
            "(32 for CIFAR, 224 for ImageNet).",
        )
        _check(
            0.0 < self.min_crop_area <= 1.0,
            f"Received: min_crop_area={self.min_crop_area}. Use a fraction "
            "in (0, 1] (the paper uses 0.08).",
        )
        _check(
            0.0 <= self.holdout_fraction < 1.0,
            f"Received: holdout_fraction={self.holdout_fraction}. Use a "
            "fraction in [0, 1).",
        )
        _check(
            0.0 <= self.color_jitter_strength,
            "Received: color_jitter_strength="
            f"{self.color_jitter_strength}. Use a value >= 0 (0 turns "
            "colour distortion off).",
        )
        _check(
            self.dataset != FOLDER_PREFIX,
            f"Received: dataset={self.dataset!r}. Give the folder path "
            f"after '{FOLDER_PREFIX}', e.g. "
            f"--dataset={FOLDER_PREFIX}/data/my_images.",
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Encoder and heads (SPEC.md §3-4)."""

    resnet_depth: int = _field(
        50, "ResNet depth: 18, 34, 50, 101, 152 or 200.", RESNET_DEPTHS
    )
    width_multiplier: int = _field(1, "ResNet width multiplier (1, 2, 3, ...).")
    resnet_base_width: int = _field(
        64,
        "Channels of the stem and block group 1 at width_multiplier 1 "
        "(block groups: b, 2b, 4b, 8b); 64 is the reference ResNet, 32 half "
        "width.",
    )
    zero_init_residual_bn: bool = _field(
        True,
        "Initialise gamma of the last BN of every residual branch to 0 (the "
        "reference); False initialises it to 1 like the other BNs (a "
        "stronger random-weights baseline).",
    )
    sk_ratio: float = _field(
        0.0,
        "Selective-kernel reduction ratio in [0, 1); 0 = off, SimCLRv2 uses "
        "0.0625 (also switches to the ResNet-D stem and shortcuts).",
    )
    se_ratio: float = _field(
        0.0, "Squeeze-excitation ratio in [0, 1); 0 = off."
    )
    batch_norm_decay: float = _field(
        0.9, "Momentum of batch-norm moving statistics."
    )
    global_bn: bool = _field(
        True, "Synchronise batch-norm statistics across replicas."
    )
    proj_head_mode: str = _field(
        "nonlinear",
        "Projection head: identity, one linear layer, or an MLP.",
        PROJ_HEAD_MODES,
    )
    proj_out_dim: int = _field(128, "Output dimension of the projection head.")
    num_proj_layers: int = _field(
        3, "Number of layers of the nonlinear projection head."
    )
    ft_proj_selector: int = _field(
        0,
        "Which projection-head tensor feeds the supervised head: 0 = "
        "encoder output, j = output of head layer j, -1 = last.",
    )
    zero_init_logits_layer: bool = _field(
        False,
        "Zero-initialise the supervised head when the weights come from "
        "--checkpoint (the head is then not restored); no effect otherwise.",
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _check(
            not (
                self.proj_head_mode == "nonlinear" and self.num_proj_layers < 1
            ),
            f"Received: num_proj_layers={self.num_proj_layers} with "
            "proj_head_mode=nonlinear. Use --num_proj_layers >= 1 or "
            "--proj_head_mode=none.",
        )
        n_hidden = num_proj_hiddens(self)
        _check(
            -(n_hidden + 1) <= self.ft_proj_selector <= n_hidden,
            f"Received: ft_proj_selector={self.ft_proj_selector}, but the "
            f"{self.proj_head_mode} projection head has {n_hidden} layers. "
            f"Use a value in [{-(n_hidden + 1)}, {n_hidden}] (0 = encoder "
            "output, -1 = last head layer).",
        )
        _check(
            self.resnet_base_width >= 2 and self.resnet_base_width % 2 == 0,
            f"Received: resnet_base_width={self.resnet_base_width}. Use an "
            "even number >= 2 (64 is the reference ResNet; 32 is half width).",
        )
        _check_positive(self, "proj_out_dim", "width_multiplier")
        for name in ("sk_ratio", "se_ratio"):
            value = getattr(self, name)
            _check(
                0.0 <= value < 1.0,
                f"Received: {name}={value}. --{name} must be in [0, 1) "
                "(0 = off; 0.0625 is the SimCLRv2 value for sk_ratio).",
            )
        _check(
            0.0 < self.batch_norm_decay < 1.0,
            f"Received: batch_norm_decay={self.batch_norm_decay}. Use a "
            "value in (0, 1), e.g. 0.9.",
        )


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """NT-Xent contrastive loss (SPEC.md §5)."""

    temperature: float = _field(
        0.1, "Temperature tau of the NT-Xent loss (> 0)."
    )
    hidden_norm: bool = _field(
        True, "L2-normalise projections before the contrastive loss."
    )

    def __post_init__(self) -> None:
        _check_positive(self, "temperature")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser, weight decay and learning-rate schedule (SPEC.md §6)."""

    optimizer: str = _field(
        "lars",
        "Optimiser: LARS, SGD with Nesterov momentum, or Adam.",
        OPTIMIZERS,
    )
    learning_rate: float = _field(
        0.3,
        "Peak learning rate per 256 examples (linear scaling) or the factor "
        "of sqrt(global batch) (sqrt scaling).",
    )
    learning_rate_scaling: str = _field(
        "linear",
        "How the learning rate scales with the global batch B: lr * B / 256 "
        "(linear) or lr * sqrt(B) (sqrt).",
        LR_SCALINGS,
    )
    momentum: float = _field(0.9, "Momentum of LARS and SGD.")
    weight_decay: float = _field(
        1e-6,
        "L2 weight decay coefficient (LARS applies it in the update; "
        "momentum and adam add weight_decay * sum(w^2)/2 to the loss).",
    )
    warmup_epochs: float = _field(
        10.0, "Epochs of linear learning-rate warm-up."
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_non_negative(
            self, "warmup_epochs", "weight_decay", "learning_rate"
        )
        _check(
            0.0 <= self.momentum < 1.0,
            f"Received: momentum={self.momentum}. Use a value in [0, 1).",
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to run, for how long, and where to keep its state (SPEC.md §7)."""

    mode: str = _field(
        "train",
        "train: train to the last step; eval: evaluate checkpoints in "
        "model_dir; train_then_eval: both.",
        MODES,
    )
    train_mode: str = _field(
        "pretrain",
        "pretrain: contrastive pretraining; finetune: supervised "
        "fine-tuning or linear evaluation (with fine_tune_after_block=4); "
        "distill: train a student on the soft labels of --teacher "
        "(SimCLRv2 distillation; the training split's labels are not "
        "needed).",
        TRAIN_MODES,
    )
    lineareval_while_pretraining: bool = _field(
        True,
        "Train a linear classifier on stop_gradient(features) while "
        "pretraining.",
    )
    fine_tune_after_block: int = _field(
        -1,
        "Freeze the encoder up to and including this block group when "
        "fine-tuning: -1 trains everything, 0 freezes the stem, 4 freezes "
        "the whole encoder (linear evaluation).",
    )
    train_batch_size: int = _field(
        512,
        "Global training batch size in images (summed over all replicas).",
    )
    train_epochs: int = _field(100, "Training length in epochs.")
    train_steps: int = _field(
        0,
        "Training length in optimiser steps; overrides train_epochs when > 0.",
    )
    steps_per_loop: int = _field(
        1,
        "Training steps run inside one tf.function call between host "
        "logging (larger is faster, coarser progress).",
    )
    grad_cache_chunk_size: int = _field(
        0,
        "Gradient caching: back-propagate the encoder in chunks of this "
        "many images per replica so the activation memory is that of one "
        "chunk (0 = off). Batch-norm statistics are then per chunk.",
    )
    checkpoint_epochs: int = _field(1, "Epochs between checkpoints.")
    checkpoint_steps: int = _field(
        0,
        "Steps between checkpoints; overrides checkpoint_epochs when > 0.",
    )
    keep_checkpoint_max: int = _field(
        5, "Number of most recent checkpoints to keep."
    )
    keep_hub_module_max: int = _field(
        1,
        "Number of most recent SavedModel exports to keep (one is written "
        "after each evaluation and at the end of training); 0 keeps all, as "
        "the reference; -1 disables export.",
    )
    checkpoint: str | None = _field(
        None,
        "Checkpoint (file prefix or directory) to initialise from when "
        "model_dir has none; the optimiser state is not restored.",
    )
    model_dir: str | None = _field(
        None,
        "Directory for checkpoints, TensorBoard events, results and exports.",
    )
    teacher: str | None = _field(
        None,
        "train_mode=distill: the teacher, a model with a supervised head: "
        "our run directory, one of our checkpoints (ckpt-N prefix), our "
        "SavedModel export (saved_model/<step>), or a reference TF2 "
        "checkpoint or SavedModel (the released SimCLRv2 models).",
    )
    distill_temperature: float = _field(
        1.0,
        "train_mode=distill: temperature T of the distillation loss "
        "T^2 * CE(softmax(teacher / T), student / T) (> 0; the paper's 1).",
    )
    distill_alpha: float = _field(
        1.0,
        "train_mode=distill: weight of the distillation term, in [0, 1]; "
        "the loss is (1 - alpha) * CE(labels, student) + alpha * "
        "distillation (1 = distillation only, no labels needed).",
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        block = self.fine_tune_after_block
        _check(
            not (self.train_mode == "pretrain" and block > -1),
            f"Received: fine_tune_after_block={block} with "
            "train_mode=pretrain. Freezing applies to fine-tuning only: use "
            "--train_mode=finetune or --fine_tune_after_block=-1.",
        )
        _check(
            -1 <= block <= 4,
            f"Received: fine_tune_after_block={block}. Use -1 (train "
            "everything) to 4 (freeze the whole encoder).",
        )
        _check_positive(
            self, "train_batch_size", "steps_per_loop", "keep_checkpoint_max"
        )
        _check_non_negative(
            self,
            "train_steps",
            "train_epochs",
            "checkpoint_steps",
            "checkpoint_epochs",
            "grad_cache_chunk_size",
        )
        _check(
            self.keep_hub_module_max >= -1,
            f"Received: keep_hub_module_max={self.keep_hub_module_max}. Use "
            "a number of exports to keep, 0 to keep all or -1 for none.",
        )
        self._check_distill()
        _check(
            self.train_steps > 0 or self.train_epochs > 0,
            "Received: train_steps=0 and train_epochs=0. Set a positive "
            "--train_steps or --train_epochs.",
        )

    def _check_distill(self) -> None:
        distill = self.train_mode == "distill"
        _check(
            distill or self.teacher is None,
            f"Received: teacher={self.teacher!r} with "
            f"train_mode={self.train_mode}. A teacher is used only when "
            "distilling: add --train_mode=distill or drop --teacher.",
        )
        _check(
            not distill or bool(self.teacher),
            "Received: train_mode=distill without --teacher. Pass "
            "--teacher=<run dir | checkpoint | SavedModel> of a model with "
            "a supervised head (e.g. a fine-tuned run).",
        )
        _check(
            not (distill and self.fine_tune_after_block > -1),
            f"Received: fine_tune_after_block={self.fine_tune_after_block} "
            "with train_mode=distill. The student trains all its layers: "
            "use --fine_tune_after_block=-1.",
        )
        _check(
            0.0 <= self.distill_alpha <= 1.0,
            f"Received: distill_alpha={self.distill_alpha}. Use a value in "
            "[0, 1] (1 = distillation only).",
        )
        _check(
            self.distill_temperature > 0,
            f"Received: distill_temperature={self.distill_temperature}. "
            "--distill_temperature must be > 0 (the paper uses 1.0).",
        )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Linear-head evaluation, the kNN monitor, logistic regression."""

    eval_batch_size: int = _field(
        256, "Global evaluation batch size in images."
    )
    eval_steps: int = _field(
        0, "Number of eval batches; 0 evaluates the whole eval split."
    )
    eval_name: str | None = _field(
        None, "Name of this evaluation (TensorBoard sub-directory)."
    )
    eval_timeout_secs: int = _field(
        600,
        "mode=eval: seconds to wait for a new checkpoint in model_dir "
        "before stopping (0 = evaluate what is there and stop). Ending "
        "without having evaluated anything is an error (exit status 2).",
    )
    knn_k: int = _field(
        200, "Neighbours of the weighted kNN monitor (0 = off)."
    )
    knn_temperature: float = _field(
        0.07, "Temperature of the weighted kNN monitor."
    )
    knn_train_examples: int = _field(
        10000, "Training images used as the kNN monitor's memory bank."
    )
    eval_logistic_regression: bool = _field(
        False,
        "Also evaluate the frozen encoder features with scikit-learn's "
        "logistic regression (standardised features, L2, C = "
        "--logistic_regression_c), fitted on the knn_train_examples "
        "training images and scored on the eval split: "
        "eval/logreg_top_1_accuracy. Needs pip install "
        "'simclr_tf[quickstart]'.",
    )
    logistic_regression_c: float = _field(
        1.0,
        "Inverse L2 regularisation strength C of --eval_logistic_regression "
        "(scikit-learn's default 1.0).",
    )

    def __post_init__(self) -> None:
        _check_positive(
            self, "eval_batch_size", "knn_temperature", "logistic_regression_c"
        )
        _check(
            not self.eval_logistic_regression
            or importlib.util.find_spec("sklearn") is not None,
            "Received: eval_logistic_regression=True, but scikit-learn is "
            "not installed. Install it with pip install "
            "'simclr_tf[quickstart]', or drop --eval_logistic_regression.",
        )
        _check_non_negative(
            self,
            "eval_steps",
            "eval_timeout_secs",
            "knn_k",
            "knn_train_examples",
        )


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Hardware, distribution and numerics of the run."""

    use_tpu: bool = _field(
        False,
        "Run on a Cloud TPU (reference default: True; here False so the "
        "default command runs on GPUs or the CPU).",
    )
    tpu_name: str | None = _field(None, "Name of the Cloud TPU.")
    tpu_zone: str | None = _field(None, "GCE zone of the Cloud TPU.")
    gcp_project: str | None = _field(None, "GCP project of the Cloud TPU.")
    master: str | None = _field(None, "Address of the TPU master (gRPC).")
    mixed_precision: str = _field(
        "auto",
        "Compute dtype of the encoder and heads (variables stay float32; the "
        "loss and logits are float32). auto: bfloat16 when training on CPUs "
        "with native bfloat16 (AVX512-BF16/AMX), else none (float32).",
        MIXED_PRECISIONS,
    )
    jit_compile: bool = _field(False, "Compile the training step with XLA.")
    cpu_replicas: int = _field(
        0,
        "Testing: split the CPU into this many logical devices and mirror "
        "over them (0 = off).",
    )
    conv_backward: str = _field(
        "auto",
        "How the encoder's conv gradients are computed (same values): tf is "
        "TensorFlow's own conv gradient; auto recomputes strided convs' "
        "padding in the backward pass and computes kernel gradients on small "
        "3x3 maps as one matmul per kernel tap, without the products with "
        "the padding, where that is faster (bfloat16; in float32 strided "
        "or 4x4); matmul does so everywhere.",
        CONV_BACKWARDS,
    )
    recompute_bn_relu: bool = _field(
        True,
        "Keep only the conv output of a conv-BN-ReLU-conv chain (the "
        "CIFAR stem's into block 1 too) for the backward pass and "
        "recompute BN-ReLU there, and recompute a projection shortcut's "
        "1x1 conv instead of keeping its output (less memory, same "
        "values; needs the fused batch norm: one replica or "
        "--global_bn=False).",
    )
    inter_op_threads: int = _field(
        0,
        "Threads of TensorFlow's pool that runs independent ops "
        "concurrently (0 = TensorFlow's default). 1 on a CPU: one op at a "
        "time, each on every core; slightly less peak memory, slightly "
        "fewer images/s.",
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_non_negative(self, "cpu_replicas")
        _check_non_negative(self, "inter_op_threads")


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run configuration, grouped by concern.

    Each group checks its own values; a check that involves two groups
    belongs in this class's `__post_init__`.
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def __post_init__(self) -> None:
        # The semi-supervised protocol fine-tunes on the labelled fraction
        # but pretrains (and distils) on every training image: a fraction
        # would silently throw away unlabelled data those modes can use.
        mode = self.train.train_mode
        _check(
            self.data.label_fraction == 1.0 or mode == "finetune",
            f"Received: label_fraction={self.data.label_fraction} with "
            f"train_mode={mode}. Only fine-tuning reads a labelled "
            "fraction (pretraining and distillation use every training "
            "image): use --train_mode=finetune or --label_fraction=1.",
        )


# Group name in `Config` -> its dataclass, in definition order.
GROUPS: dict[str, type] = {
    f.name: f.default.__class__ for f in dataclasses.fields(Config)
}


def fields() -> list[dataclasses.Field]:
    """Every leaf field of `Config` (one per flag), in definition order."""
    return [f for group in GROUPS.values() for f in dataclasses.fields(group)]


def field_names() -> list[str]:
    """Every leaf field name (= flag name) of `Config`, in definition order."""
    return [f.name for f in fields()]


def from_flat(values: dict[str, Any]) -> Config:
    """Builds a `Config` from a flat {flag_name: value} mapping.

    Names missing from `values` keep their defaults.

    Raises:
      ConfigError: a name that is not a config field, or an invalid value.
    """
    return replace(Config(), **values)


def replace(config: Config, **values: Any) -> Config:
    """`config` with some fields changed, by flag name, across groups.

    Each changed group is rebuilt with `dataclasses.replace`, so the result
    is checked like any config.

    Raises:
      ConfigError: a name that is not a config field, or an invalid value.
    """
    unknown = set(values) - set(field_names())
    if unknown:
        raise ConfigError(f"Unknown config fields: {sorted(unknown)}.")
    groups = {}
    for name, cls in GROUPS.items():
        changes = {
            f.name: values[f.name]
            for f in dataclasses.fields(cls)
            if f.name in values
        }
        if changes:
            groups[name] = dataclasses.replace(getattr(config, name), **changes)
    return dataclasses.replace(config, **groups)


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


def _flag_line(name: str, value: Any) -> str:
    """`--name=value` as absl serializes it; "" for None (the default)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    return f"--{name}={value}"


def flags_text(config: Config) -> str:
    """A config as flags, one `--name=value` per line, replayable with
    `--flagfile` (a None value has no line and keeps its flag's default)."""
    lines = (_flag_line(name, value) for name, value in to_flat(config).items())
    return "".join(line + "\n" for line in lines if line)


def write_flags_file(config: Config, model_dir: str) -> str:
    """Writes `flags_text(config)` to `model_dir/flags.cfg`; returns the
    path. No absl here: scripts with flags of their own can call it."""
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "flags.cfg")
    with open(path, "w") as f:
        f.write(flags_text(config))
    return path


# --------------------------------------------------------------------------
# Derived values: pure functions of the config, never written back.


def use_cifar_stem(image_size: int) -> bool:
    """The 3x3 stride-1 stem without max-pool is used for images <= 32."""
    return image_size <= 32
