"""Weights from the reference SimCLR TF2 code and its released models.

`--checkpoint` (and `scripts/convert_checkpoint.py`) accept, besides our
own checkpoints:

1. a training checkpoint of the reference TF2 code, `model_dir/ckpt-N`
   or its `model_dir`;
2. a SavedModel of the reference `save()` -- the format of the released
   SimCLRv2 / SimCLRv1 TF2 models -- `.../saved_model/N/` or
   `.../saved_model/` (the highest N).

Both are object-based checkpoints whose object graph gives each
variable's `full_name`; `interop_names` places those names onto our model
by structure. The architecture is inferred from the shapes; weights that
cannot be placed and places that cannot be filled are one error listing
them. The optimizer state is not carried over. The released TF1
checkpoints (`model.ckpt-N`, `base_model/...`) are refused with a pointer
to their TF2 SavedModel twins (README, "Use the released SimCLR models").
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import trackable_object_graph_pb2

from simclr_tf import config as config_lib
from simclr_tf import interop_arch, interop_names

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
OURS = "ours"
REFERENCE_CHECKPOINT = "reference training checkpoint"
REFERENCE_SAVED_MODEL = "reference SavedModel"


class SourceError(config_lib.ConfigError):
    """`--checkpoint` is not loadable or does not fit the run."""


@dataclasses.dataclass
class Source:
    """A checkpoint to initialise from.

    Attributes:
      kind: `OURS`, `REFERENCE_CHECKPOINT` or `REFERENCE_SAVED_MODEL`.
      prefix: the checkpoint prefix to read.
      step: the training step, when the source records it.
      names: {reference variable name: checkpoint key} (reference kinds).
    """

    kind: str
    prefix: str
    step: int | None = None
    names: dict = dataclasses.field(default_factory=dict)


def _latest_saved_model(directory: str) -> str | None:
    steps = [
        int(name.rstrip("/"))
        for name in tf.io.gfile.listdir(directory)
        if name.rstrip("/").isdigit()
        and tf.io.gfile.exists(
            os.path.join(directory, name.rstrip("/"), "saved_model.pb")
        )
    ]
    return os.path.join(directory, str(max(steps))) if steps else None


def _not_a_format(path: str) -> SourceError:
    return SourceError(
        f"Received: checkpoint={path!r}, which is not a known format. Pass "
        "a ckpt-N prefix or model_dir (ours or the reference TF2 code's), "
        "or a reference SavedModel directory (.../saved_model/N)."
    )


def _prefix_of(path: str) -> tuple[str, str | None]:
    """(checkpoint prefix, SavedModel dir or None) for a user path."""
    if tf.io.gfile.isdir(path):
        if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
            return os.path.join(path, "variables", "variables"), path
        latest = tf.train.latest_checkpoint(path)
        if latest is not None:
            return latest, None
        for directory in (path, os.path.join(path, "saved_model")):
            if tf.io.gfile.isdir(directory):
                found = _latest_saved_model(directory)
                if found is not None:
                    return _prefix_of(found)
        raise _not_a_format(path)
    if tf.io.gfile.exists(path + ".index"):
        return path, None
    raise SourceError(
        f"Received: checkpoint={path!r}, which does not exist (no "
        f"directory, no {path}.index). Check the path."
    )


def _read_graph(path: str, prefix: str):
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise SourceError(
            f"Cannot read checkpoint {prefix!r} ({type(e).__name__}): the "
            "file is truncated or corrupt. Copy or download it again."
        ) from e
    shapes = reader.get_variable_to_shape_map()
    if OBJECT_GRAPH_KEY not in shapes:
        if any(name.startswith("base_model/") for name in shapes):
            raise SourceError(
                f"Received: checkpoint={path!r}, a TF1 checkpoint of the "
                "released SimCLR models, which is not supported. Use the "
                "TF2 SavedModel of the same model (gs://simclr-checkpoints-"
                "tf2/simclrv2/... or .../simclrv1/...), see README.md."
            )
        raise _not_a_format(path)
    try:
        graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
            reader.get_tensor(OBJECT_GRAPH_KEY)
        )
    except Exception as e:  # Protobuf decode errors have no common base.
        raise SourceError(
            f"Cannot read the object graph of checkpoint {prefix!r}: the "
            "file is truncated or corrupt. Copy or download it again."
        ) from e
    return reader, graph


def _child(graph, node_id: int, name: str) -> int | None:
    for ref in graph.nodes[node_id].children:
        if ref.local_name == name:
            return ref.node_id
    return None


def _variables_under(graph, node_id: int) -> dict[str, str]:
    """{full_name: checkpoint_key} of every variable below `node_id`."""
    found, stack, seen = {}, [node_id], set()
    while stack:
        nid = stack.pop()
        if nid in seen:
            continue
        seen.add(nid)
        for attribute in graph.nodes[nid].attributes:
            if attribute.name == "VARIABLE_VALUE":
                name = re.sub(r":\d+$", "", attribute.full_name)
                found[name] = attribute.checkpoint_key
        stack.extend(ref.node_id for ref in graph.nodes[nid].children)
    return found


def detect(path: str) -> Source:
    """Finds out what `path` is (see the module docstring).

    Raises:
      SourceError: a missing path, an unknown format, a TF1 checkpoint or
        an unreadable file.
    """
    prefix, saved_model_dir = _prefix_of(path)
    reader, graph = _read_graph(path, prefix)
    model_id = _child(graph, 0, "model")
    if model_id is not None and _child(graph, model_id, "encoder") is not None:
        return Source(OURS, prefix)
    if model_id is None or _child(graph, model_id, "resnet_model") is None:
        raise _not_a_format(path)
    if saved_model_dir is not None:
        base = os.path.basename(os.path.normpath(saved_model_dir))
        step = int(base) if base.isdigit() else None
        kind = REFERENCE_SAVED_MODEL
    else:
        step_id = _child(graph, 0, "global_step")
        step = None
        if step_id is not None:
            key = graph.nodes[step_id].attributes[0].checkpoint_key
            step = int(reader.get_tensor(key))
        kind = REFERENCE_CHECKPOINT
    return Source(kind, prefix, step, _variables_under(graph, model_id))


def infer_architecture(source: Source) -> interop_arch.Architecture:
    """The architecture of a reference source (`interop_arch.infer`).

    Raises:
      SourceError: a layout that is no ResNet of the reference.
    """
    reader = tf.train.load_checkpoint(source.prefix)
    shapes = reader.get_variable_to_shape_map()
    by_name = {name: shapes[key] for name, key in source.names.items()}
    try:
        return interop_arch.infer(by_name, source.prefix)
    except interop_arch.ArchitectureError as e:
        raise SourceError(str(e)) from e


def describe(source: Source, arch: interop_arch.Architecture) -> str:
    """A few lines on what the source holds (for scripts and logs)."""
    return "\n".join(
        [
            f"source: {source.kind} {source.prefix}",
            *interop_arch.describe(arch),
            f"step: {source.step}",
        ]
    )


def _check_readable(source: Source) -> None:
    """Reads every model tensor once: a truncated file fails here, before
    the run writes anything."""
    reader = tf.train.load_checkpoint(source.prefix)
    for name, key in source.names.items():
        try:
            reader.get_tensor(key)
        except tf.errors.OpError as e:
            raise SourceError(
                f"Cannot read {name!r} from {source.prefix!r}: the file is "
                "truncated or corrupt. Copy or download it again."
            ) from e


def check_config(
    config: config_lib.Config,
    source: Source,
    num_classes: int | None,
    check_readable: bool = True,
) -> interop_arch.Architecture:
    """Checks the run's flags against the source's inferred architecture.

    Args:
      config: the run config.
      source: a reference source from `detect`.
      num_classes: classes of the run's dataset (None: no labels).
      check_readable: also read every tensor once (a truncated file).

    Returns:
      The source's architecture.

    Raises:
      SourceError: one line naming every mismatch and its fix.
    """
    if check_readable:
        _check_readable(source)
    arch = infer_architecture(source)
    problems = interop_arch.mismatches(config, arch)
    head = interop_arch.head_problem(config, arch, num_classes)
    if head:
        problems.append(head)
    if problems:
        raise SourceError(
            f"Checkpoint {source.prefix} ({source.kind}) does not fit this "
            "run: " + "; ".join(problems) + "."
        )
    return arch


def restore(model, config: config_lib.Config, source: Source) -> None:
    """Copies every weight of a reference source into `model`.

    The supervised head is left as built when `zero_init_logits_layer`
    (or when the run has none); everything else must match one to one.

    Raises:
      SourceError: weights that cannot be placed or places left empty,
        listed by name.
    """
    reader = tf.train.load_checkpoint(source.prefix)
    parsed = interop_names.ParsedNames(source.names)
    theirs = interop_names.source_slots(parsed)
    keep_head = model.supervised_head is not None and not (
        config.model.zero_init_logits_layer
    )
    ours = interop_names.model_slots(model, include_supervised=keep_head)
    if not keep_head:
        theirs = {
            k: v for k, v in theirs.items() if not k.startswith("head_super")
        }
    if config.model.proj_head_mode == "none":
        theirs = {
            k: v for k, v in theirs.items() if not k.startswith("projection")
        }
    unplaced = sorted(theirs[k] for k in set(theirs) - set(ours))
    unplaced += parsed.unknown
    empty = sorted(set(ours) - set(theirs))
    wrong = []
    values = {}
    for slot in sorted(set(ours) & set(theirs)):
        try:
            value = reader.get_tensor(source.names[theirs[slot]])
        except tf.errors.OpError as e:
            raise SourceError(
                f"Cannot read {theirs[slot]!r} from {source.prefix!r}: the "
                "file is truncated or corrupt. Copy or download it again."
            ) from e
        if tuple(value.shape) != tuple(ours[slot].shape):
            wrong.append(
                f"{theirs[slot]} {list(value.shape)} -> {slot} "
                f"{list(ours[slot].shape)}"
            )
        values[slot] = value
    _raise_unmatched(source, unplaced, empty, wrong)
    for slot, value in values.items():
        ours[slot].assign(np.asarray(value, dtype=ours[slot].dtype))
    logging.info(
        "Initialised %d weights from %s (%s); optimizer state not loaded.",
        len(values),
        source.prefix,
        source.kind,
    )


def _raise_unmatched(source, unplaced, empty, wrong) -> None:
    parts = []
    if unplaced:
        parts.append(f"weights with no place here: {', '.join(unplaced)}")
    if empty:
        parts.append(f"places the source does not fill: {', '.join(empty)}")
    if wrong:
        parts.append(f"shapes that differ: {', '.join(wrong)}")
    if parts:
        raise SourceError(
            f"Checkpoint {source.prefix} ({source.kind}) does not map onto "
            "this model; nothing was loaded. " + "; ".join(parts) + "."
        )
