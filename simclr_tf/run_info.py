"""The facts of a run, written once beside `config.json`: `run_info.json`.

A run's config says what was asked; some facts are only known once the
run has started: the dataset's classes and split sizes, the compute
precision `--mixed_precision=auto` resolved to, the total number of steps
`--train_epochs` gives. The experiment writes them; exports and
checkpoint checks read them instead of reverse-engineering them.
"""

from __future__ import annotations

import dataclasses
import json
import os

FILENAME = "run_info.json"


class RunInfoError(ValueError):
    """A model_dir without a readable `run_info.json`."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a run found out about itself.

    Attributes:
      num_classes: classes of the training dataset; None without labels.
      class_names: class names in label order, when known.
      num_train_examples: examples in the training split.
      num_eval_examples: examples in the eval split (0 if absent).
      dtype_policy: the Keras dtype policy the model computed with
        ("float32", "mixed_bfloat16" or "mixed_float16").
      total_steps: the step training stops at.
    """

    num_classes: int | None
    class_names: tuple[str, ...] | None
    num_train_examples: int
    num_eval_examples: int
    dtype_policy: str
    total_steps: int


def write(info: RunInfo, model_dir: str) -> str:
    """Writes `info` to `model_dir/run_info.json`; returns the path."""
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, FILENAME)
    values = dataclasses.asdict(info)
    if values["class_names"] is not None:
        values["class_names"] = list(values["class_names"])
    with open(path, "w") as f:
        json.dump(values, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def read(model_dir: str) -> RunInfo:
    """Reads `model_dir/run_info.json`.

    Raises:
      RunInfoError: the file is missing or lacks a field.
    """
    path = os.path.join(model_dir, FILENAME)
    if not os.path.exists(path):
        raise RunInfoError(
            f"Received: model_dir={model_dir!r}, which has no {FILENAME}. "
            "run.py writes it when a run starts (older versions did not): "
            "point --model_dir at a run's directory, or restart the run "
            "with its flags (it resumes from its last checkpoint)."
        )
    with open(path) as f:
        values = json.load(f)
    names = [field.name for field in dataclasses.fields(RunInfo)]
    missing = [name for name in names if name not in values]
    if missing:
        raise RunInfoError(
            f"{path} lacks {', '.join(missing)}. Rewrite it by restarting "
            "the run with run.py."
        )
    if values["class_names"] is not None:
        values["class_names"] = tuple(values["class_names"])
    return RunInfo(**{name: values[name] for name in names})
