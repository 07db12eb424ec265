"""Variable names of the reference SimCLR TF2 code, mapped onto our model.

The reference code (google-research/simclr `tf2/`, tf_keras) names every
variable by its Keras-2 name scopes, e.g.
`resnet/block_group2/bottleneck_block_3/sk__conv2d_3/conv2d_22/kernel` or
`projection_head/nl_0/batch_norm_relu_21/batch_normalization_21/gamma`.
Both its training checkpoints and its SavedModels (the released SimCLRv2
TF2 models) carry these names as the `full_name` of each variable in the
checkpoint's object graph.

The numeric suffixes are Keras-2 creation counters of one process, so they
say nothing on their own. This module places a variable by structure:
the block group (`block_groupK` scope), the block (its scope, ordered
within the group), the sublayer kind (fixed-padding conv, BN, selective
kernel, squeeze-excitation, dense) and its position among the sublayers of
the same kind inside that block (the reference builds them in a fixed
order: projection shortcut first, then the residual branch). Shapes are
checked afterwards against our model, slot by slot.

Slots are named after our model's attributes, e.g.
`block_group2/block1/sk_conv/mix_bn/gamma`, `stem/conv0/kernel`,
`projection_head/nl_0/dense/kernel`, `head_supervised/dense/bias`.
"""

from __future__ import annotations

import collections
import re

import keras

_SUFFIXED = re.compile(r"^(?P<base>.+?)(?:_(?P<n>\d+))?$")
_LEAVES = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")
_ENCODER = re.compile(r"^resnet(_\d+)?$")
_GROUP = re.compile(r"^block_group(\d)$")
# Block scopes of the reference -> our block types.
_BLOCK_SCOPES = {"residual_block": "basic", "bottleneck_block": "bottleneck"}


def _split(segment: str) -> tuple[str, int]:
    """`conv2d_fixed_padding_5` -> ("conv2d_fixed_padding", 5); no suffix
    is the first instance (0)."""
    m = _SUFFIXED.match(segment)
    return m.group("base"), int(m.group("n") or 0)


def _conv_or_bn(segment: str) -> tuple[str, int] | None:
    base, n = _split(segment)
    if base in ("conv2d_fixed_padding", "conv2d"):
        return "conv", n
    if base == "batch_norm_relu":
        return "bn", n
    return None


class _Block:
    """The variables found in one block (or the stem), by sublayer kind."""

    def __init__(self):
        # kind -> {creation index: {leaf: source name}}
        self.parts = collections.defaultdict(
            lambda: collections.defaultdict(dict)
        )

    def add(self, kind: str, index: int, leaf: str, name: str) -> None:
        self.parts[kind][index][leaf] = name

    def ordered(self, kind: str) -> list[dict[str, str]]:
        return [self.parts[kind][i] for i in sorted(self.parts[kind])]


def _add_in_block(block: _Block, rest: list[str], name: str) -> bool:
    """Files `rest` (the name below the block scope) under its sublayer."""
    leaf = rest[-1]
    head = _split(rest[0])
    if head[0] == "sk__conv2d" and len(rest) >= 3:
        inner = _split(rest[1])
        if inner[0] == "conv2d_fixed_padding":
            block.add("sk_conv", 0, leaf, name)
            return True
        if inner[0] == "conv2d":
            block.add("sk_mix_conv", inner[1], leaf, name)
            return True
        if inner[0] == "batch_norm_relu":
            block.add("sk_bn", inner[1], leaf, name)
            return True
        return False
    if head[0] == "se__layer" and len(rest) == 3:
        block.add("se", _split(rest[1])[1], leaf, name)
        return True
    kind = _conv_or_bn(rest[0])
    if kind is None or len(rest) not in (2, 3):
        return False
    block.add(kind[0], kind[1], leaf, name)
    return True


class ParsedNames:
    """Reference variable names grouped by structure.

    Attributes:
      stem: the stem's `_Block`.
      groups: {group number 1..4: [block `_Block`s in order]}.
      block_type: "basic", "bottleneck" or None (no blocks).
      proj_layers: {layer index: {"dense"|"bn": {leaf: name}}}.
      proj_mode: "nonlinear", "linear" or "none".
      supervised: {leaf: name} of the supervised head's dense layer.
      unknown: names outside the scheme.
    """

    def __init__(self, names):
        self.stem = _Block()
        self.groups = {}
        self.block_type = None
        self.proj_layers = collections.defaultdict(
            lambda: collections.defaultdict(dict)
        )
        self.proj_mode = "none"
        self.supervised = {}
        self.unknown = []
        blocks = collections.defaultdict(dict)  # group -> {n: _Block}
        for name in names:
            if not self._add(name.split("/"), name, blocks):
                self.unknown.append(name)
        for g, by_n in sorted(blocks.items()):
            self.groups[g] = [by_n[n] for n in sorted(by_n)]

    def _add(self, segs, name, blocks) -> bool:
        if len(segs) < 2 or segs[-1] not in _LEAVES:
            return False
        if _ENCODER.match(segs[0]):
            group = _GROUP.match(segs[1])
            if group is None:
                return _add_in_block(self.stem, segs[1:], name)
            if len(segs) < 4:
                return False
            base, n = _split(segs[2])
            block_type = _BLOCK_SCOPES.get(base)
            if block_type is None or self.block_type not in (
                None,
                block_type,
            ):
                return False
            self.block_type = block_type
            block = blocks[int(group.group(1))].setdefault(n, _Block())
            return _add_in_block(block, segs[3:], name)
        if segs[0] == "projection_head" and len(segs) in (4, 5):
            base, j = _split(segs[1])
            if base not in ("nl", "l"):
                return False
            self.proj_mode = "nonlinear" if base == "nl" else "linear"
            part = _split(segs[2])[0]
            if part == "dense":
                self.proj_layers[j]["dense"][segs[-1]] = name
                return len(segs) == 4
            if part == "batch_norm_relu":
                self.proj_layers[j]["bn"][segs[-1]] = name
                return len(segs) == 5
            return False
        if segs[0] == "head_supervised" and len(segs) == 4:
            if _split(segs[2])[0] != "dense":
                return False
            self.supervised[segs[-1]] = name
            return True
        return False


def _bottleneck_roles(block: _Block, projection: bool) -> tuple[list, list]:
    sk = bool(block.parts.get("sk_conv"))
    convs = ["conv1"] + ([] if sk else ["conv2"]) + ["conv3"]
    bns = ["bn1"] + ([] if sk else ["bn2"]) + ["bn3"]
    if projection:
        convs, bns = ["shortcut_conv", *convs], ["shortcut_bn", *bns]
    return convs, bns


def _block_slots(block: _Block, block_type: str, prefix: str) -> dict:
    """{slot: source name} of one block; the creation order puts the
    projection shortcut first (reference `ResidualBlock`/`BottleneckBlock`
    build it before the residual branch)."""
    main = 2 if block_type == "basic" else 3
    if block.parts.get("sk_conv"):
        main -= 1
    convs_found = block.ordered("conv")
    projection = len(convs_found) == main + 1
    if block_type == "basic":
        convs, bns = ["conv1", "conv2"], ["bn1", "bn2"]
        if projection:
            convs, bns = ["shortcut_conv", *convs], ["shortcut_bn", *bns]
    else:
        convs, bns = _bottleneck_roles(block, projection)
    slots = {}
    roles = [
        ("conv", convs),
        ("bn", bns),
        ("sk_conv", ["sk_conv/conv"]),
        ("sk_bn", ["sk_conv/bn", "sk_conv/mix_bn"]),
        ("sk_mix_conv", ["sk_conv/mix_conv0", "sk_conv/mix_conv1"]),
        ("se", ["se/reduce", "se/expand"]),
    ]
    for kind, names in roles:
        for i, leaves in enumerate(block.ordered(kind)):
            role = names[i] if i < len(names) else f"{kind}?{i}"
            for leaf, name in leaves.items():
                slots[f"{prefix}/{role}/{leaf}"] = name
    return slots


def source_slots(parsed: ParsedNames) -> dict[str, str]:
    """{our slot: reference variable name} for every parsed variable."""
    slots = {}
    for i, leaves in enumerate(parsed.stem.ordered("conv")):
        for leaf, name in leaves.items():
            slots[f"stem/conv{i}/{leaf}"] = name
    for i, leaves in enumerate(parsed.stem.ordered("bn")):
        for leaf, name in leaves.items():
            slots[f"stem/bn{i}/{leaf}"] = name
    for g, blocks in parsed.groups.items():
        for b, block in enumerate(blocks, start=1):
            prefix = f"block_group{g}/block{b}"
            slots.update(_block_slots(block, parsed.block_type, prefix))
    layer = "nl" if parsed.proj_mode == "nonlinear" else "l"
    for j, parts in parsed.proj_layers.items():
        for part, leaves in parts.items():
            for leaf, name in leaves.items():
                slots[f"projection_head/{layer}_{j}/{part}/{leaf}"] = name
    for leaf, name in parsed.supervised.items():
        slots[f"head_supervised/dense/{leaf}"] = name
    return slots


# --------------------------------------------------------------------------
# Our model's slots.

_BLOCK_LAYERS = (
    "shortcut_conv",
    "shortcut_bn",
    "conv1",
    "bn1",
    "conv2",
    "bn2",
    "conv3",
    "bn3",
)
_SK_LAYERS = ("conv", "bn", "mix_conv0", "mix_bn", "mix_conv1")


def _leaves(prefix: str, layer, out: dict) -> None:
    for leaf in _LEAVES:
        var = getattr(layer, leaf, None)
        if isinstance(var, keras.Variable):
            out[f"{prefix}/{leaf}"] = var


def _block_model_slots(prefix: str, block, out: dict) -> None:
    for attr in _BLOCK_LAYERS:
        layer = getattr(block, attr, None)
        if layer is not None:
            _leaves(f"{prefix}/{attr}", layer, out)
    if getattr(block, "sk_conv", None) is not None:
        for attr in _SK_LAYERS:
            _leaves(
                f"{prefix}/sk_conv/{attr}", getattr(block.sk_conv, attr), out
            )
    if block.se is not None:
        _leaves(f"{prefix}/se/reduce", block.se.reduce, out)
        _leaves(f"{prefix}/se/expand", block.se.expand, out)


def model_slots(
    model, include_supervised: bool = True
) -> dict[str, keras.Variable]:
    """{slot: variable} of a built `SimCLRModel` (slots as `source_slots`)."""
    out = {}
    stem = model.encoder.stem
    for i, (conv, bn) in enumerate(zip(stem.convs, stem.bns, strict=True)):
        _leaves(f"stem/conv{i}", conv, out)
        _leaves(f"stem/bn{i}", bn, out)
    for g, group in enumerate(model.encoder.block_groups, start=1):
        for b, block in enumerate(group.blocks, start=1):
            _block_model_slots(f"block_group{g}/block{b}", block, out)
    for layer in model.projection_head.linear_layers:
        _leaves(f"projection_head/{layer.name}/dense", layer.dense, out)
        if layer.bn is not None:
            _leaves(f"projection_head/{layer.name}/bn", layer.bn, out)
    if include_supervised and model.supervised_head is not None:
        _leaves("head_supervised/dense", model.supervised_head.dense, out)
    return out
