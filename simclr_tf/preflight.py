"""The checks a run makes before it writes anything to its model_dir.

A run that refuses to start leaves its model_dir as it found it, and a
run that could only fail after training (no eval split, no labels to
evaluate with, fine-tuning without labels) fails before its first step.
`experiment.prepare` calls `check_run` once the strategy is built and the
data source opened (a `MultiWorkerMirroredStrategy` must exist before any
TensorFlow op runs, and opening a source runs some); `run.py` writes
`flags.cfg` only after it.

The export at the end of training has no failure a flag can cause (it
rebuilds the trained architecture and replaces an export of the same
step), so it needs no check here.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf import run_info as run_info_lib
from simclr_tf.data import sources
from simclr_tf.models import factory
from simclr_tf.training import checkpoints

# Eval labels looked at to tell a labelled eval split from an unlabelled
# one (a split is one or the other: folders label whole split folders).
_LABELS_PEEKED = 256


class ModelDirError(config_lib.ConfigError):
    """model_dir holds checkpoints that this run cannot continue."""


def _read_json(path: str) -> dict | None:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def _describe_classes(num_classes: int | None) -> str:
    return "none (unlabelled)" if num_classes is None else str(num_classes)


def _class_differences(theirs: dict, info: sources.DatasetInfo) -> list[str]:
    """The class count or names of the run in model_dir vs this dataset."""
    num, names = theirs.get("num_classes"), theirs.get("class_names")
    if num != info.num_classes:
        return [
            f"classes={_describe_classes(num)} there vs "
            f"{_describe_classes(info.num_classes)} here"
        ]
    if names and info.class_names and tuple(names) != info.class_names:
        i = next(
            i
            for i, (a, b) in enumerate(
                zip(names, info.class_names, strict=True)
            )
            if a != b
        )
        return [f"class {i}={names[i]!r} there vs {info.class_names[i]!r} here"]
    return []


def _head_difference(
    theirs: dict, num_classes: int | None, config: config_lib.Config
) -> list[str]:
    """Whether one run has a supervised head and the other not."""
    had = num_classes is not None and (
        theirs.get("train_mode", "pretrain") != "pretrain"
        or bool(theirs.get("lineareval_while_pretraining"))
    )
    has = factory.has_supervised_head(config, num_classes)
    if had == has:
        return []
    t = config.train
    return [
        f"supervised head {'present' if had else 'absent'} there vs "
        f"{'present' if has else 'absent'} here (train_mode="
        f"{theirs.get('train_mode')!r} there vs {t.train_mode!r} here, "
        "lineareval_while_pretraining="
        f"{theirs.get('lineareval_while_pretraining')!r} there vs "
        f"{t.lineareval_while_pretraining!r} here)"
    ]


def _optimizer_differences(
    theirs: dict | None, facts: dict | None, config: config_lib.Config
) -> list[str]:
    """The checkpoints hold the optimizer's state: its kind, and under
    float16 the loss-scale wrapper's (`build_model_and_optimizer`)."""
    diffs = []
    ours = config.optim.optimizer
    if theirs is not None and theirs.get("optimizer", ours) != ours:
        diffs.append(
            f"optimizer={theirs['optimizer']!r} there vs {ours!r} here (the "
            "checkpoints hold its state)"
        )
    if facts is not None and "dtype_policy" in facts:
        scaled = facts["dtype_policy"] == "mixed_float16"
        if scaled != (config.runtime.mixed_precision == "float16"):
            diffs.append(
                f"compute precision {facts['dtype_policy']} there vs "
                f"--mixed_precision={config.runtime.mixed_precision} here "
                "(float16 checkpoints hold a loss-scaled optimizer)"
            )
    return diffs


def check_model_dir(
    config: config_lib.Config, info: sources.DatasetInfo
) -> None:
    """Refuses to resume checkpoints that do not fit this run.

    When model_dir holds checkpoints, the run would restore them: the
    architecture (`factory.ARCHITECTURE_FIELDS`, the stem) and the
    optimizer must equal the ones in its `config.json`, and the classes,
    supervised head and float16 loss scaling the ones in its
    `run_info.json`. A model_dir without checkpoints is not checked
    (it holds nothing a run could lose).

    Raises:
      ModelDirError: one line naming each difference and the two ways out.
    """
    model_dir = config.train.model_dir
    if not model_dir or not tf.train.latest_checkpoint(model_dir):
        return
    diffs = []
    theirs = _read_json(os.path.join(model_dir, "config.json"))
    if theirs is not None:
        diffs += checkpoints.architecture_differences(theirs, config, "there")
    facts = _read_json(os.path.join(model_dir, run_info_lib.FILENAME))
    if facts is not None:
        diffs += _class_differences(facts, info)
        if theirs is not None and facts.get("num_classes") == info.num_classes:
            diffs += _head_difference(theirs, info.num_classes, config)
    diffs += _optimizer_differences(theirs, facts, config)
    if diffs:
        raise ModelDirError(
            f"Received: model_dir={model_dir!r}, which holds checkpoints of "
            f"another model: {'; '.join(diffs)}. Nothing was changed there. "
            "Resume that run with its flags (--flagfile="
            f"{os.path.join(model_dir, 'flags.cfg')}), or give this run a "
            "new --model_dir."
        )


def check_labels_for_finetune(
    config: config_lib.Config, info: sources.DatasetInfo
) -> None:
    """Fine-tuning trains a classifier: it needs labels.

    Raises:
      DatasetError: train_mode=finetune on unlabelled data.
    """
    if config.train.train_mode == "finetune":
        info.require_labels(
            config.data.dataset,
            "train_mode=finetune",
            "Fine-tune on a labelled dataset (class subfolders) or use "
            "--train_mode=pretrain.",
        )


def check_eval_data(config: config_lib.Config, source: sources.Source) -> None:
    """For mode=eval and train_then_eval: the eval split exists, has
    images, and they are labelled.

    Raises:
      DatasetError: naming the split or dataset and how to fix it.
    """
    mode, data = config.train.mode, config.data
    if mode == "train":
        return
    split, name = data.eval_split, data.dataset
    source.info.require_labels(
        name,
        f"mode={mode}",
        "Evaluation (linear head, kNN) needs classes (one subfolder per "
        "class): use --mode=train to pretrain only.",
    )
    # Raises, saying how to make the split, when the source lacks it.
    records = source.records(split)
    if source.info.num_eval_examples == 0:
        raise sources.DatasetError(
            f"Received: eval_split={split!r}, which has no images in "
            f"{name!r}. Put images there or use --mode=train."
        )
    labels = records.take(_LABELS_PEEKED).map(lambda record, label: label)
    if any(int(y) == sources.NO_LABEL for y in labels.as_numpy_iterator()):
        raise sources.DatasetError(
            f"Received: eval_split={split!r} of {name!r}, whose images have "
            f"no labels (the train split has {source.info.num_classes} "
            "classes). Put the eval images in class subfolders named as the "
            "train split's, or use --mode=train."
        )


def check_run(config: config_lib.Config, source: sources.Source) -> None:
    """Every check a run makes before it writes anything (module doc).

    Raises:
      ConfigError: the first check that fails (its subclasses
        `ModelDirError`, `DatasetError`).
    """
    check_model_dir(config, source.info)
    check_labels_for_finetune(config, source.info)
    check_eval_data(config, source)
