"""Command-line flags: the reference SimCLR flags and ours, and nothing else.

This is the only module that defines or reads absl flags. Flag names and
defaults follow the reference implementation (SPEC.md §1) so its README
commands run unchanged; `use_tpu` defaults to False here. Every flag name is
also a field of `simclr_tf.config.Config`, which `config_from_flags` fills.
"""

from __future__ import annotations

import os

from absl import flags

from simclr_tf import config as config_lib

# --- Learning rate, schedule and optimiser (SPEC.md §6). -----------------
flags.DEFINE_float(
    "learning_rate",
    0.3,
    "Peak learning rate per 256 examples (linear scaling) or the factor of "
    "sqrt(global batch) (sqrt scaling).",
)
flags.DEFINE_enum(
    "learning_rate_scaling",
    "linear",
    config_lib.LR_SCALINGS,
    "How the learning rate scales with the global batch B: lr * B / 256 "
    "(linear) or lr * sqrt(B) (sqrt).",
)
flags.DEFINE_float(
    "warmup_epochs", 10, "Epochs of linear learning-rate warm-up."
)
flags.DEFINE_float(
    "weight_decay",
    1e-6,
    "L2 weight decay coefficient (LARS applies it in the update; momentum "
    "and adam add weight_decay * sum(w^2)/2 to the loss).",
)
flags.DEFINE_enum(
    "optimizer",
    "lars",
    config_lib.OPTIMIZERS,
    "Optimiser: LARS, SGD with Nesterov momentum, or Adam.",
)
flags.DEFINE_float("momentum", 0.9, "Momentum of LARS and SGD.")

# --- Batch, length, checkpoints (SPEC.md §7). ----------------------------
flags.DEFINE_integer(
    "train_batch_size",
    512,
    "Global training batch size in images (summed over all replicas).",
)
flags.DEFINE_string("train_split", "train", "Dataset split to train on.")
flags.DEFINE_integer("train_epochs", 100, "Training length in epochs.")
flags.DEFINE_integer(
    "train_steps",
    0,
    "Training length in optimiser steps; overrides train_epochs when > 0.",
)
flags.DEFINE_integer(
    "eval_steps",
    0,
    "Number of eval batches; 0 evaluates the whole eval split.",
)
flags.DEFINE_integer(
    "eval_batch_size", 256, "Global evaluation batch size in images."
)
flags.DEFINE_integer("checkpoint_epochs", 1, "Epochs between checkpoints.")
flags.DEFINE_integer(
    "checkpoint_steps",
    0,
    "Steps between checkpoints; overrides checkpoint_epochs when > 0.",
)
flags.DEFINE_string("eval_split", "validation", "Dataset split to evaluate.")
flags.DEFINE_string(
    "dataset",
    "imagenet2012",
    "A TFDS dataset name (e.g. cifar10, imagenet2012, "
    "imagenet2012_subset/1pct), or 'folder:/path' for a folder of images "
    "(class subfolders, optionally inside split folders such as train/ and "
    "val/; or a flat folder of unlabeled images for pretraining).",
)
flags.DEFINE_bool(
    "cache_dataset",
    False,
    "Cache the decoded dataset in memory (small datasets only).",
)
flags.DEFINE_enum(
    "mode",
    "train",
    config_lib.MODES,
    "train: train to the last step; eval: evaluate checkpoints in "
    "model_dir; train_then_eval: both.",
)
flags.DEFINE_enum(
    "train_mode",
    "pretrain",
    config_lib.TRAIN_MODES,
    "pretrain: contrastive pretraining; finetune: supervised fine-tuning "
    "or linear evaluation (with fine_tune_after_block=4).",
)
flags.DEFINE_bool(
    "lineareval_while_pretraining",
    True,
    "Train a linear classifier on stop_gradient(features) while pretraining.",
)
flags.DEFINE_string(
    "checkpoint",
    None,
    "Checkpoint (file prefix or directory) to initialise from when "
    "model_dir has none; the optimiser state is not restored.",
)
flags.DEFINE_bool(
    "zero_init_logits_layer",
    False,
    "Zero-initialise the supervised head when fine-tuning.",
)
flags.DEFINE_integer(
    "fine_tune_after_block",
    -1,
    "Freeze the encoder up to and including this block group when "
    "fine-tuning: -1 trains everything, 0 freezes the stem, 4 freezes the "
    "whole encoder (linear evaluation).",
)
flags.DEFINE_string("master", None, "Address of the TPU master (gRPC).")
flags.DEFINE_string(
    "model_dir",
    None,
    "Directory for checkpoints, TensorBoard events, results and exports.",
)
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_bool(
    "use_tpu",
    False,
    "Run on a Cloud TPU (reference default: True; here False so the default "
    "command runs on GPUs or the CPU).",
)
flags.DEFINE_string("tpu_name", None, "Name of the Cloud TPU.")
flags.DEFINE_string("tpu_zone", None, "GCE zone of the Cloud TPU.")
flags.DEFINE_string("gcp_project", None, "GCP project of the Cloud TPU.")
flags.DEFINE_string(
    "eval_name", None, "Name of this evaluation (TensorBoard sub-directory)."
)
flags.DEFINE_integer(
    "keep_checkpoint_max", 5, "Number of most recent checkpoints to keep."
)
flags.DEFINE_integer(
    "keep_hub_module_max",
    1,
    "Number of most recent SavedModel exports to keep; 0 disables export.",
)

# --- Loss and model (SPEC.md §3-5). --------------------------------------
flags.DEFINE_float(
    "temperature", 0.1, "Temperature tau of the NT-Xent loss (> 0)."
)
flags.DEFINE_bool(
    "hidden_norm",
    True,
    "L2-normalise projections before the contrastive loss.",
)
flags.DEFINE_enum(
    "proj_head_mode",
    "nonlinear",
    config_lib.PROJ_HEAD_MODES,
    "Projection head: identity, one linear layer, or an MLP.",
)
flags.DEFINE_integer(
    "proj_out_dim", 128, "Output dimension of the projection head."
)
flags.DEFINE_integer(
    "num_proj_layers",
    3,
    "Number of layers of the nonlinear projection head.",
)
flags.DEFINE_integer(
    "ft_proj_selector",
    0,
    "Which projection-head tensor feeds the supervised head: 0 = encoder "
    "output, j = output of head layer j, -1 = last.",
)
flags.DEFINE_bool(
    "global_bn",
    True,
    "Synchronise batch-norm statistics across replicas.",
)
flags.DEFINE_float(
    "batch_norm_decay", 0.9, "Momentum of batch-norm moving statistics."
)
flags.DEFINE_integer(
    "width_multiplier", 1, "ResNet width multiplier (1, 2, 3, ...)."
)
flags.DEFINE_integer(
    "resnet_base_width",
    64,
    "Channels of the stem and block group 1 at width_multiplier 1 (block "
    "groups: b, 2b, 4b, 8b); 64 is the reference ResNet, 32 half width.",
)
flags.DEFINE_bool(
    "zero_init_residual_bn",
    True,
    "Initialise gamma of the last BN of every residual branch to 0 (the "
    "reference); False initialises it to 1 like the other BNs (a stronger "
    "random-weights baseline).",
)
flags.DEFINE_integer(
    "resnet_depth", 50, "ResNet depth: 18, 34, 50, 101, 152 or 200."
)
flags.DEFINE_float(
    "sk_ratio",
    0.0,
    "Selective-kernel reduction ratio in [0, 1); 0 = off, SimCLRv2 uses "
    "0.0625 (also switches to the ResNet-D stem and shortcuts).",
)
flags.DEFINE_float(
    "se_ratio",
    0.0,
    "Squeeze-excitation ratio in [0, 1); 0 = off.",
)
flags.DEFINE_integer(
    "image_size", 224, "Side in pixels of the square network input."
)

# --- Augmentation (SPEC.md §2). ------------------------------------------
flags.DEFINE_float(
    "color_jitter_strength",
    1.0,
    "Colour distortion strength s (0 turns it off).",
)
flags.DEFINE_bool(
    "use_blur", True, "Gaussian blur in the pretraining augmentation."
)
flags.DEFINE_enum(
    "color_jitter_impl",
    "v2",
    config_lib.COLOR_JITTER_IMPLS,
    "Brightness form of the colour jitter: v2 multiplies by "
    "U(1 - 0.8s, 1 + 0.8s), v1 adds U(-0.8s, 0.8s).",
)
flags.DEFINE_float(
    "min_crop_area",
    0.08,
    "Smallest fraction of the image area a random crop keeps.",
)
flags.DEFINE_bool(
    "use_flip", True, "Random horizontal flips in training views."
)
flags.DEFINE_float(
    "holdout_fraction",
    0.0,
    "Image folders without an eval-split subfolder: fraction of the "
    "training images held out (deterministically) as the eval split.",
)
flags.DEFINE_integer(
    "seed",
    None,
    "Seed for initialisation, shuffling and augmentation; unset means a "
    "fresh random run.",
)

# --- Ours: engine and runtime. -------------------------------------------
flags.DEFINE_integer(
    "steps_per_loop",
    1,
    "Training steps run inside one tf.function call between host "
    "logging (larger is faster, coarser progress).",
)
flags.DEFINE_integer(
    "grad_cache_chunk_size",
    0,
    "Gradient caching: back-propagate the encoder in chunks of this many "
    "images per replica so the activation memory is that of one chunk "
    "(0 = off). Batch-norm statistics are then per chunk.",
)
flags.DEFINE_integer(
    "knn_k", 200, "Neighbours of the weighted kNN monitor (0 = off)."
)
flags.DEFINE_float(
    "knn_temperature", 0.07, "Temperature of the weighted kNN monitor."
)
flags.DEFINE_integer(
    "knn_train_examples",
    10000,
    "Training images used as the kNN monitor's memory bank.",
)
flags.DEFINE_enum(
    "mixed_precision",
    "auto",
    config_lib.MIXED_PRECISIONS,
    "Compute dtype of the encoder and heads (variables stay float32; the "
    "loss and logits are float32). auto: bfloat16 when training on CPUs "
    "with native bfloat16 (AVX512-BF16/AMX), else none (float32).",
)
flags.DEFINE_bool("jit_compile", False, "Compile the training step with XLA.")
flags.DEFINE_enum(
    "conv_backward",
    "auto",
    config_lib.CONV_BACKWARDS,
    "How the encoder's conv gradients are computed (same values): tf is "
    "TensorFlow's own conv gradient; auto recomputes strided convs' padding "
    "in the backward pass and computes kernel gradients on small 3x3 maps "
    "as one matmul per kernel tap (faster there); matmul does so everywhere.",
)
flags.DEFINE_bool(
    "recompute_bn_relu",
    True,
    "Keep only the conv output of a conv-BN-ReLU-conv chain for the backward "
    "pass and recompute BN-ReLU there (less memory, same values; needs the "
    "fused batch norm: one replica or --global_bn=False).",
)
flags.DEFINE_integer(
    "cpu_replicas",
    0,
    "Testing: split the CPU into this many logical devices and mirror over "
    "them (0 = off).",
)

FLAGS = flags.FLAGS

# Names of the flags this module defines: the flags that make up a run.
FLAG_NAMES = tuple(config_lib.field_names())


def config_from_flags() -> config_lib.Config:
    """Reads every flag once and returns the validated, frozen config.

    Raises:
      ConfigError: an invalid value, with a message naming it.
    """
    values = {name: FLAGS[name].value for name in FLAG_NAMES}
    return config_lib.validate(config_lib.from_flat(values))


def flags_file_text() -> str:
    """The run's flags, one `--name=value` per line, replayable with
    `--flagfile`."""
    lines = (FLAGS[name].serialize() for name in FLAG_NAMES)
    # A flag whose value is None serializes to "" and keeps its default.
    return "".join(line + "\n" for line in lines if line)


def write_flags_file(model_dir: str) -> None:
    """Writes the run's flags to `model_dir/flags.cfg` (replayable with
    `--flagfile`)."""
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "flags.cfg"), "w") as f:
        f.write(flags_file_text())
