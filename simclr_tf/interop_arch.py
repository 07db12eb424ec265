"""What a reference checkpoint's shapes say about its architecture.

Depth, width, selective kernels, squeeze-excitation, stem, heads and
classes of a model written by the reference SimCLR TF2 code, read off
the shapes of its variables (named as in `interop_names`), and the flags
of a run that contradict them. Used by `simclr_tf.interop`.
"""

from __future__ import annotations

import dataclasses

from simclr_tf import config as config_lib
from simclr_tf import interop_names
from simclr_tf.models import resnet
from simclr_tf.models.layers import SK_MIN_DIM

_REFERENCE_BASE_WIDTH = 64
# The reference's only selective-kernel ratio (SimCLRv2 "sk1").
_SK_RATIO = 0.0625


class ArchitectureError(config_lib.ConfigError):
    """A checkpoint whose variables are no ResNet of the reference."""


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
    hidden_dims: tuple = ()  # widths of [h, h_1, ..., h_L] of the head
    se_widths: tuple = ()  # SE bottleneck width per block group
    sk_widths: tuple = ()  # SK mixing width per block group
    supervised_input_dim: int | None = None


def infer(shapes: dict[str, tuple], where: str) -> Architecture:
    """Reads depth, width, SK, SE, heads and classes off the shapes.

    Args:
      shapes: {reference variable name: shape} of the source's model.
      where: the source, for messages.

    Raises:
      ArchitectureError: a layout that is no ResNet of the reference.
    """
    parsed = interop_names.ParsedNames(shapes)
    slots = interop_names.source_slots(parsed)

    def shape(slot):
        return tuple(shapes[slots[slot]]) if slot in slots else None

    stem_convs = parsed.stem.ordered("conv")
    blocks = tuple(len(parsed.groups.get(g, ())) for g in range(1, 5))
    depths = [
        d
        for d, spec in resnet.BLOCKS.items()
        if spec == (parsed.block_type, blocks)
    ]
    if not stem_convs or not depths:
        raise ArchitectureError(
            f"Checkpoint {where!r} has no ResNet of the reference "
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
        global_bn=any("sync_batch_normalization" in n for n in shapes),
        hidden_dims=_hidden_dims(parsed, slots, shape),
        se_widths=_group_widths(shape, "se/reduce/kernel"),
        sk_widths=_group_widths(shape, "sk_conv/mix_conv0/kernel"),
        supervised_input_dim=sup[0] if sup else None,
    )


def _group_widths(shape, slot: str) -> tuple:
    shapes = [shape(f"block_group{g}/block1/{slot}") for g in range(1, 5)]
    return tuple(s[-1] for s in shapes if s is not None)


def _hidden_dims(parsed, slots, shape) -> tuple:
    layer = "nl" if parsed.proj_mode == "nonlinear" else "l"
    kernels = [
        shape(f"projection_head/{layer}_{j}/dense/kernel")
        for j in sorted(parsed.proj_layers)
    ]
    if not kernels or None in kernels:
        return ()
    return (kernels[0][0], *(k[-1] for k in kernels))


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


def _widths(arch: Architecture, ratio: float, minimum: int) -> tuple:
    """Inner widths max(minimum, int(filters * ratio)) of the SE or SK
    layers of the four block groups (() when `ratio` is 0)."""
    if ratio <= 0:
        return ()
    base = arch.resnet_base_width * arch.width_multiplier
    return tuple(max(minimum, int(base * 2**g * ratio)) for g in range(4))


def mismatches(config: config_lib.Config, arch: Architecture) -> list[str]:
    """One "<flag>=<source> in the source vs <run> here" per contradiction."""
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
    if arch.se_widths != _widths(arch, m.se_ratio, 1):
        differ("se_ratio", arch.se_ratio, m.se_ratio)
    bottleneck = resnet.BLOCKS[arch.resnet_depth][0] == "bottleneck"
    if bottleneck and arch.sk_ratio > 0 and m.sk_ratio > 0:
        # Selective kernels sit in bottlenecks only.
        if arch.sk_widths != _widths(arch, m.sk_ratio, SK_MIN_DIM):
            differ("sk_ratio", arch.sk_ratio, m.sk_ratio)
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


def head_problem(
    config: config_lib.Config, arch: Architecture, num_classes: int | None
) -> str | None:
    """Why the run's supervised head cannot come from the source, if so."""
    if not wants_supervised(config, num_classes):
        return None
    if arch.num_classes is None:
        return (
            "the source has no supervised head; pass "
            "--zero_init_logits_layer to start a new one"
        )
    selector = config.model.ft_proj_selector
    if arch.hidden_dims and -len(arch.hidden_dims) <= selector < len(
        arch.hidden_dims
    ):
        if arch.hidden_dims[selector] != arch.supervised_input_dim:
            return (
                f"the source's supervised head reads a "
                f"{arch.supervised_input_dim}-wide layer, "
                f"ft_proj_selector={selector} here selects a "
                f"{arch.hidden_dims[selector]}-wide one; use the source "
                "run's --ft_proj_selector or --zero_init_logits_layer"
            )
    if arch.num_classes != num_classes:
        return (
            f"the source's supervised head has {arch.num_classes} classes, "
            f"this run's dataset {num_classes}; pass "
            "--zero_init_logits_layer to start a new head"
        )
    return None


def wants_supervised(config: config_lib.Config, num_classes) -> bool:
    """Whether the run's supervised head is initialised from the source."""
    from simclr_tf.models import factory

    if not factory.has_supervised_head(config, num_classes):
        return False
    return not config.model.zero_init_logits_layer


def describe(arch: Architecture) -> list[str]:
    """Lines on what a source holds (for scripts and logs)."""
    heads = []
    if arch.proj_head_mode != "none":
        heads.append(
            f"projection head {arch.proj_head_mode} "
            f"({arch.num_proj_layers} layers, out {arch.proj_out_dim})"
        )
    if arch.num_classes is not None:
        heads.append(f"supervised head ({arch.num_classes} classes)")
    stem = "CIFAR" if arch.cifar_stem else "ImageNet"
    return [
        f"architecture: ResNet-{arch.resnet_depth} "
        f"{arch.width_multiplier}x (base width {arch.resnet_base_width})"
        f", sk_ratio={arch.sk_ratio:g}, se_ratio={arch.se_ratio:g}, "
        f"{stem} stem, global_bn={arch.global_bn}",
        f"heads: {', '.join(heads) or 'none'}",
        "EMA: none (the TF2 reference keeps no EMA copy)",
    ]
