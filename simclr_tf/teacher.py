"""The teacher of a distillation run (`--train_mode=distill --teacher=...`).

`--teacher` may name, checked in this order:

1. our run directory (`config.json`, `run_info.json` and a checkpoint:
   the latest is used);
2. one of our checkpoints, a `ckpt-N` prefix inside such a directory;
3. our SavedModel export, `<model_dir>/saved_model/<step>/` (or
   `<model_dir>/saved_model/`, the highest step): its
   `assets/simclr_metadata.json` gives the architecture, and its variables
   (the export's `variables` list, in the order of the model's variables)
   are read into a model built from it. We rebuild rather than call the
   exported function so that every teacher is the same `SimCLRModel`,
   built once in float32 inside the strategy scope;
4. a reference TF2 training checkpoint or SavedModel (the released
   SimCLRv2 models), read through `simclr_tf.interop`: the architecture
   is inferred from the shapes (`convert.config_for`).

In every case the teacher is a `SimCLRModel` with a supervised head,
built in float32, its layers not trainable, called with `training=False`
under `tf.stop_gradient`. It is held by the distillation objective, not
by the student: the student's checkpoints hold no teacher variable, and a
resumed run loads the teacher again from `--teacher`.

A reference model's supervised head reads one tensor of its projection
head (the reference's `ft_proj_selector`), which the shapes do not always
name (ResNet-50's head layers are all 2048 wide). For a reference
SavedModel the teacher takes the tensor whose logits equal those of the
SavedModel's own function on a random batch. A reference training
checkpoint has no function: the teacher reads the first projection-head
layer (`ft_proj_selector=1`, the SimCLRv2 semi-supervised fine-tuning of
SPEC.md §8) when its width fits, else the first tensor whose width fits,
and says so in a warning.
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib
from simclr_tf import convert, export, interop
from simclr_tf import run_info as run_info_lib
from simclr_tf.models import factory

RUN = "run directory"
CHECKPOINT = "checkpoint"
EXPORT = "SavedModel export"
# SimCLRv2 fine-tunes from the first projection-head layer (SPEC.md §8).
_PREFERRED_SELECTOR = 1


class TeacherError(config_lib.ConfigError):
    """`--teacher` is missing, unreadable or does not fit the run."""


@dataclasses.dataclass
class TeacherSpec:
    """What `--teacher` holds, read without building a model.

    Attributes:
      path: the path the user gave.
      kind: `RUN`, `CHECKPOINT`, `EXPORT` or an `interop` kind.
      config: a run config with the teacher's architecture.
      num_classes: classes of its supervised head (None: it has none).
      class_names: class names in label order, when known.
      prefix: the checkpoint prefix its weights are read from.
      source: the `interop.Source` of a reference teacher.
      selectors: reference teachers: the projection-head tensors whose
        width fits the supervised head (more than one: ambiguous).
    """

    path: str
    kind: str
    config: config_lib.Config
    num_classes: int | None
    class_names: tuple[str, ...] | None
    prefix: str
    source: interop.Source | None = None
    selectors: tuple[int, ...] = ()


def _error(path: str, what: str) -> TeacherError:
    return TeacherError(f"Received: teacher={path!r}, {what}")


def _read_json(path: str, name: str, teacher: str) -> dict:
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except (ValueError, tf.errors.OpError) as e:
        raise _error(
            teacher,
            f"whose {name} cannot be read ({type(e).__name__}). "
            "Point --teacher at a finished run or copy it again.",
        ) from e


def _config_from(values: dict, teacher: str) -> config_lib.Config:
    """A run config from a flat dict; unknown names (newer runs) dropped."""
    known = set(config_lib.field_names())
    try:
        return config_lib.from_flat(
            {k: v for k, v in values.items() if k in known}
        )
    except config_lib.ConfigError as e:
        raise _error(teacher, f"whose config is invalid: {e}") from e


def _our_run(path: str, run_dir: str, prefix: str, kind: str) -> TeacherSpec:
    config = _config_from(
        _read_json(os.path.join(run_dir, "config.json"), "config.json", path),
        path,
    )
    try:
        info = run_info_lib.read(run_dir)
    except run_info_lib.RunInfoError as e:
        raise _error(path, f"a run without run_info.json ({e})") from e
    num_classes = info.num_classes
    if not factory.has_supervised_head(config, num_classes):
        num_classes = None
    return TeacherSpec(
        path, kind, config, num_classes, info.class_names, prefix
    )


def _latest_export(directory: str) -> str | None:
    steps = [
        int(name.rstrip("/"))
        for name in tf.io.gfile.listdir(directory)
        if name.rstrip("/").isdigit()
    ]
    for step in sorted(steps, reverse=True):
        candidate = os.path.join(directory, str(step))
        if _is_export(candidate):
            return candidate
    return None


def _is_export(path: str) -> bool:
    return tf.io.gfile.exists(
        os.path.join(path, "saved_model.pb")
    ) and tf.io.gfile.exists(
        os.path.join(path, "assets", export.METADATA_FILENAME)
    )


def _our_export(path: str, export_dir: str) -> TeacherSpec:
    meta = _read_json(
        os.path.join(export_dir, "assets", export.METADATA_FILENAME),
        export.METADATA_FILENAME,
        path,
    )
    names = (*factory.ARCHITECTURE_FIELDS, "ft_proj_selector", "image_size")
    values = {name: meta[name] for name in names if name in meta}
    num_classes = meta.get("num_classes")
    values["train_mode"] = "finetune" if num_classes else "pretrain"
    values["lineareval_while_pretraining"] = False
    config = _config_from(values, path)
    names = meta.get("class_names")
    return TeacherSpec(
        path,
        EXPORT,
        config,
        num_classes,
        tuple(names) if names else None,
        os.path.join(export_dir, "variables", "variables"),
    )


def _fitting_selectors(arch) -> tuple[int, ...]:
    """The projection-head tensors whose width fits the supervised head."""
    dims = arch.hidden_dims
    return tuple(
        j for j, d in enumerate(dims) if d == arch.supervised_input_dim
    )


def _default_selector(fits: tuple[int, ...]) -> int:
    if _PREFERRED_SELECTOR in fits:
        return _PREFERRED_SELECTOR
    return fits[0] if fits else 0


def _reference(path: str) -> TeacherSpec:
    try:
        source = interop.detect(path)
    except interop.SourceError as e:
        raise TeacherError(str(e).replace("checkpoint=", "teacher=", 1)) from e
    if source.kind == interop.OURS:
        raise _error(
            path,
            "one of our checkpoints without config.json and "
            "run_info.json beside it. Point --teacher at the run directory.",
        )
    arch = interop.infer_architecture(source)
    fits = _fitting_selectors(arch)
    config = convert.config_for(arch, ft_proj_selector=_default_selector(fits))
    return TeacherSpec(
        path,
        source.kind,
        config,
        arch.num_classes,
        None,
        source.prefix,
        source,
        fits,
    )


def inspect(path: str) -> TeacherSpec:
    """Finds out what `--teacher` names (module docstring), reading only
    its small files.

    Raises:
      TeacherError: a missing path or a format that is none of those.
    """
    if tf.io.gfile.isdir(path):
        if tf.io.gfile.exists(os.path.join(path, "config.json")):
            prefix = tf.train.latest_checkpoint(path)
            if prefix is not None:
                return _our_run(path, path, prefix, RUN)
        if _is_export(path):
            return _our_export(path, path)
        for directory in (path, os.path.join(path, "saved_model")):
            if tf.io.gfile.isdir(directory):
                found = _latest_export(directory)
                if found is not None:
                    return _our_export(path, found)
    elif tf.io.gfile.exists(path + ".index"):
        run_dir = os.path.dirname(path)
        if tf.io.gfile.exists(os.path.join(run_dir, "config.json")):
            return _our_run(path, run_dir, path, CHECKPOINT)
    elif not tf.io.gfile.exists(path):
        raise _error(path, "which does not exist. Check the path.")
    return _reference(path)


def _check_readable(spec: TeacherSpec) -> None:
    """Reads every tensor once: a truncated file fails before training."""
    try:
        reader = tf.train.load_checkpoint(spec.prefix)
        for key in reader.get_variable_to_shape_map():
            if not key.startswith("optimizer/"):  # Not used.
                reader.get_tensor(key)
    # The reader raises IndexError for a data file cut short.
    except (tf.errors.OpError, ValueError, IndexError) as e:
        raise _error(
            spec.path,
            f"whose weights {spec.prefix!r} cannot be read "
            f"({type(e).__name__}): the file is truncated or corrupt.",
        ) from e


def check(path: str, num_classes: int | None) -> TeacherSpec:
    """Checks `--teacher` against the run before anything is written.

    Args:
      path: `--teacher`.
      num_classes: classes of the run's dataset (None: no labels, then
        any number of teacher classes fits).

    Returns:
      The teacher's `TeacherSpec`.

    Raises:
      TeacherError: missing, unreadable, no supervised head, or classes
        that differ from the dataset's.
    """
    spec = inspect(path)
    if spec.num_classes is None:
        raise _error(
            path,
            f"a {spec.kind} without a supervised head (a pretraining "
            "run without its linear head). Distil from a fine-tuned run: "
            "--train_mode=finetune first.",
        )
    if num_classes is not None and spec.num_classes != num_classes:
        raise _error(
            path,
            f"whose supervised head has {spec.num_classes} classes, "
            f"but the dataset has {num_classes}. Distil on data of the "
            "teacher's classes (or on unlabelled images).",
        )
    _check_readable(spec)
    return spec


class Teacher:
    """A frozen classifier whose logits the student learns.

    Args:
      model: the teacher's built float32 `SimCLRModel` (supervised head).
      spec: what it was loaded from.
    """

    def __init__(self, model: keras.Model, spec: TeacherSpec):
        self.model = model
        self.spec = spec
        self.num_classes = spec.num_classes
        self.class_names = spec.class_names

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        """(n, classes) float32 logits of (n, H, W, 3) images, inference
        mode (BN moving statistics), no gradient."""
        outputs = self.model(tf.cast(images, tf.float32), training=False)
        return tf.stop_gradient(tf.cast(outputs["logits_sup"], tf.float32))


def _relative_difference(ours: tf.Tensor, theirs: tf.Tensor) -> float:
    scale = float(tf.reduce_max(tf.abs(theirs))) or 1.0
    return float(tf.reduce_max(tf.abs(ours - theirs))) / scale


def _choose_selector(model: keras.Model, spec: TeacherSpec) -> None:
    """Sets which projection-head tensor the supervised head reads when
    the shapes leave it open (module docstring)."""
    if len(spec.selectors) < 2:
        return
    if spec.source.kind != interop.REFERENCE_SAVED_MODEL:
        logging.warning(
            "Teacher %s: its supervised head could read projection-head "
            "tensors %s (equal widths); using %d (SimCLRv2 fine-tuning).",
            spec.path,
            list(spec.selectors),
            model.ft_proj_selector,
        )
        return
    loaded = tf.saved_model.load(os.path.dirname(os.path.dirname(spec.prefix)))
    size = min(spec.config.data.image_size, 64)
    images = tf.random.stateless_uniform((2, size, size, 3), seed=(0, 1))
    theirs = loaded(images, trainable=False)["logits_sup"]
    errors = {}
    for j in spec.selectors:
        model.ft_proj_selector = j
        ours = model(images, training=False)["logits_sup"]
        errors[j] = _relative_difference(ours, theirs)
    model.ft_proj_selector = min(errors, key=errors.get)
    logging.info(
        "Teacher %s: the supervised head reads projection-head tensor %d "
        "(relative difference to the SavedModel's logits %.1e).",
        spec.path,
        model.ft_proj_selector,
        errors[model.ft_proj_selector],
    )


def _restore(model: keras.Model, spec: TeacherSpec) -> None:
    if spec.source is not None:
        try:
            interop.check_config(spec.config, spec.source, spec.num_classes)
            interop.restore(model, spec.config, spec.source)
        except interop.SourceError as e:
            raise _error(spec.path, f"which cannot be loaded: {e}") from e
        return
    if spec.kind == EXPORT:
        # The export's root tracks the model's variables as one list.
        ckpt = tf.train.Checkpoint(variables=[v.value for v in model.variables])
    else:
        ckpt = tf.train.Checkpoint(model=model)
    try:
        status = ckpt.read(spec.prefix)  # No save_counter of its own.
        status.assert_existing_objects_matched()
        status.expect_partial()  # Optimizer slots, the hub functions.
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise _error(
            spec.path, f"whose weights do not fit its own config: {first}"
        ) from e


def load(path: str, strategy: tf.distribute.Strategy) -> Teacher:
    """Builds the teacher in float32 inside `strategy` and restores it.

    Raises:
      TeacherError: as `check`, or weights that do not fit.
    """
    spec = inspect(path)
    if spec.num_classes is None:
        raise _error(path, f"a {spec.kind} without a supervised head.")
    with strategy.scope():
        model = factory.build_model(spec.config, spec.num_classes, "float32")
        _restore(model, spec)
        model.trainable = False
    if spec.source is not None:
        # Outside the scope: the reference SavedModel is only compared.
        _choose_selector(model, spec)
    logging.info(
        "Teacher: %s %s (ResNet-%d %dx, %d classes).",
        spec.kind,
        spec.prefix,
        spec.config.model.resnet_depth,
        spec.config.model.width_multiplier,
        spec.num_classes,
    )
    return Teacher(model, spec)
