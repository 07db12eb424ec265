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
from simclr_tf import interop_names
from simclr_tf.models import resnet
from simclr_tf.models.layers import SK_MIN_DIM

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
OURS = "ours"
REFERENCE_CHECKPOINT = "reference training checkpoint"
REFERENCE_SAVED_MODEL = "reference SavedModel"
_REFERENCE_BASE_WIDTH = 64
# The reference's only selective-kernel ratio (SimCLRv2 "sk1").
_SK_RATIO = 0.0625


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


@dataclasses.dataclass
class Architecture:
    """What the source's shapes say about its model (config field names)."""

    resnet_depth: int
    width_multiplier: int
    resnet_base_width: int
    cifar_stem: bool
    sk_ratio: float
    se_ratio: float
    proj_head_mode: str
    num_proj_layers: int
    proj_out_dim: int | None
    num_classes: int | None
    global_bn: bool


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


def _shape(shapes, source, name):
    return tuple(shapes[source.names[name]])


def infer_architecture(source: Source) -> Architecture:
    """Reads depth, width, SK, SE, heads and classes off the shapes.

    Raises:
      SourceError: a layout that is no ResNet of the reference.
    """
    shapes = tf.train.load_checkpoint(source.prefix).get_variable_to_shape_map()
    parsed = interop_names.ParsedNames(source.names)
    slots = interop_names.source_slots(parsed)

    def shape(slot):
        return _shape(shapes, source, slots[slot]) if slot in slots else None

    stem_convs = parsed.stem.ordered("conv")
    blocks = tuple(len(parsed.groups.get(g, ())) for g in range(1, 5))
    depths = [
        d
        for d, spec in resnet.BLOCKS.items()
        if spec == (parsed.block_type, blocks)
    ]
    if not stem_convs or not depths:
        raise SourceError(
            f"Checkpoint {source.prefix!r} has no ResNet of the reference "
            f"({parsed.block_type} blocks per group {blocks}, "
            f"{len(stem_convs)} stem convs)."
        )
    channels = shape(f"stem/conv{len(stem_convs) - 1}/kernel")[-1]
    base, width = channels, 1
    if channels % _REFERENCE_BASE_WIDTH == 0:
        base, width = _REFERENCE_BASE_WIDTH, channels // _REFERENCE_BASE_WIDTH
    kernel = shape("stem/conv0/kernel")[0]
    cifar = len(stem_convs) == 1 and kernel == 3
    sk_ratio = _infer_sk(parsed, slots, shape, len(stem_convs))
    se = shape("block_group1/block1/se/reduce/kernel")
    se_ratio = se[-1] / (channels) if se else 0.0
    layers = sorted(parsed.proj_layers)
    prefix = "nl" if parsed.proj_mode == "nonlinear" else "l"
    last = None
    if layers:
        last = shape(f"projection_head/{prefix}_{layers[-1]}/dense/kernel")
    sup = shape("head_supervised/dense/kernel")
    names = list(source.names)
    return Architecture(
        resnet_depth=depths[0],
        width_multiplier=width,
        resnet_base_width=base,
        cifar_stem=cifar,
        sk_ratio=sk_ratio,
        se_ratio=se_ratio,
        proj_head_mode=parsed.proj_mode,
        num_proj_layers=len(layers) if parsed.proj_mode == "nonlinear" else 3,
        proj_out_dim=last[-1] if last else None,
        num_classes=sup[-1] if sup else None,
        global_bn=any("sync_batch_normalization" in n for n in names),
    )


def _infer_sk(parsed, slots, shape, num_stem_convs) -> float:
    """The smallest ratio that gives the mixing widths found (0 = no SK)."""
    ratios = []
    for g, blocks in parsed.groups.items():
        for b in range(1, len(blocks) + 1):
            mix = shape(f"block_group{g}/block{b}/sk_conv/mix_conv0/kernel")
            if mix is not None:
                ratios.append((mix[-2], mix[-1]))  # (filters, mid)
    if not ratios:
        return _SK_RATIO if num_stem_convs == 3 else 0.0
    if all(mid == max(int(f * _SK_RATIO), SK_MIN_DIM) for f, mid in ratios):
        return _SK_RATIO
    return max(mid / f for f, mid in ratios)


def _mismatches(
    config: config_lib.Config, arch: Architecture, num_classes: int | None
) -> list[str]:
    m = config.model
    out = []

    def differ(name, theirs, ours, fix=None):
        out.append(
            f"{name}={theirs!r} in the source vs {ours!r} here"
            + (f" ({fix})" if fix else "")
        )

    if arch.resnet_depth != m.resnet_depth:
        differ("resnet_depth", arch.resnet_depth, m.resnet_depth)
    theirs = arch.resnet_base_width * arch.width_multiplier
    if theirs != m.resnet_base_width * m.width_multiplier:
        differ("width_multiplier", arch.width_multiplier, m.width_multiplier)
    if arch.sk_ratio > 0 and m.sk_ratio <= 0:
        differ("sk_ratio", arch.sk_ratio, m.sk_ratio, "selective kernels")
    if arch.sk_ratio == 0 and m.sk_ratio > 0 and not arch.cifar_stem:
        differ("sk_ratio", arch.sk_ratio, m.sk_ratio, "no selective kernels")
    if (arch.se_ratio > 0) != (m.se_ratio > 0):
        differ("se_ratio", arch.se_ratio, m.se_ratio)
    cifar = config_lib.use_cifar_stem(config.data.image_size)
    if arch.cifar_stem != cifar:
        stem = "the CIFAR stem" if arch.cifar_stem else "the ImageNet stem"
        out.append(
            f"the source has {stem}, image_size={config.data.image_size} "
            "here selects the other"
        )
    for name in ("proj_head_mode", "proj_out_dim"):
        theirs, ours = getattr(arch, name), getattr(m, name)
        if m.proj_head_mode != "none" and theirs != ours:
            differ(name, theirs, ours)
    if arch.proj_head_mode == m.proj_head_mode == "nonlinear":
        if arch.num_proj_layers != m.num_proj_layers:
            differ("num_proj_layers", arch.num_proj_layers, m.num_proj_layers)
    if arch.proj_head_mode == "none" and m.ft_proj_selector != 0:
        differ(
            "ft_proj_selector",
            0,
            m.ft_proj_selector,
            "the source has no projection head: use --ft_proj_selector=0 "
            "--proj_head_mode=none",
        )
    return out


def _head_problem(
    config: config_lib.Config, arch: Architecture, num_classes: int | None
) -> str | None:
    if not _wants_supervised(config, num_classes):
        return None
    if arch.num_classes is None:
        return (
            "the source has no supervised head; pass "
            "--zero_init_logits_layer to start a new one"
        )
    if arch.num_classes != num_classes:
        return (
            f"the source's supervised head has {arch.num_classes} classes, "
            f"this run's dataset {num_classes}; pass "
            "--zero_init_logits_layer to start a new head"
        )
    return None


def _wants_supervised(config: config_lib.Config, num_classes) -> bool:
    """Whether the run's supervised head is initialised from the source."""
    from simclr_tf.models import factory

    if not factory.has_supervised_head(config, num_classes):
        return False
    return not config.model.zero_init_logits_layer


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
    config: config_lib.Config, source: Source, num_classes: int | None
) -> Architecture:
    """Checks the run's flags against the source's inferred architecture.

    Raises:
      SourceError: one line naming every mismatch and its fix.
    """
    _check_readable(source)
    arch = infer_architecture(source)
    problems = _mismatches(config, arch, num_classes)
    head = _head_problem(config, arch, num_classes)
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


def describe(source: Source, arch: Architecture) -> str:
    """A few lines on what the source holds (for scripts and logs)."""
    heads = []
    if arch.proj_head_mode != "none":
        heads.append(
            f"projection head {arch.proj_head_mode} "
            f"({arch.num_proj_layers} layers, out {arch.proj_out_dim})"
        )
    if arch.num_classes is not None:
        heads.append(f"supervised head ({arch.num_classes} classes)")
    stem = "CIFAR" if arch.cifar_stem else "ImageNet"
    return "\n".join(
        [
            f"source: {source.kind} {source.prefix}",
            f"architecture: ResNet-{arch.resnet_depth} "
            f"{arch.width_multiplier}x (base width {arch.resnet_base_width})"
            f", sk_ratio={arch.sk_ratio:g}, se_ratio={arch.se_ratio:g}, "
            f"{stem} stem, global_bn={arch.global_bn}",
            f"heads: {', '.join(heads) or 'none'}",
            "EMA: none (the TF2 reference keeps no EMA copy)",
            f"step: {source.step}",
        ]
    )
