"""ResNet v1 encoder of SimCLR v1/v2 (SPEC.md §3), as Keras 3 layers.

Post-activation ResNet (He et al., arXiv:1512.03385) with the choices of the
reference `tf2/resnet.py`: the stride sits on the 3x3 conv of a bottleneck
(v1.5), strided convs use explicit "fixed" padding, the last BN of each block
starts with gamma = 0, every block group starts with a projection shortcut,
and optionally selective kernels + ResNet-D (SimCLRv2, arXiv:1903.06586,
arXiv:1812.01187), squeeze-excitation (arXiv:1709.01507) and a CIFAR stem.

All tensors are NHWC. Layers follow the global Keras dtype policy; the
pooled features (`final_avg_pool`) are float32. This module holds the stem
and the network; the residual blocks and block groups are in
`simclr_tf.models.blocks`, and the layers both are made of (batch norm,
fixed-padding conv, selective kernels, squeeze-excitation) in
`simclr_tf.models.layers`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf.models.blocks import BlockGroup
from simclr_tf.models.layers import (
    Conv2DFixedPadding,
    batch_norm,
    build_once,
    fused_batch_norm,
    set_layer_attributes,
)

# depth -> (block type, blocks per group), reference `resnet()`.
BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
ENDPOINTS = (
    "initial_conv",
    "initial_max_pool",
    "block_group1",
    "block_group2",
    "block_group3",
    "block_group4",
    "final_avg_pool",
)

_register = keras.saving.register_keras_serializable(package="simclr_tf")


@_register
class Stem(keras.layers.Layer):
    """The input layers before block group 1 (SPEC.md §3).

    CIFAR stem: 3x3 stride-1 conv (bm), BN-ReLU, no pooling. Otherwise a
    7x7 stride-2 conv (bm) -- or, with `sk_ratio > 0`, the ResNet-D stem of
    three 3x3 convs (bm/2 stride 2, bm/2, bm, BN-ReLU between) -- then
    BN-ReLU and a 3x3 stride-2 SAME max-pool. b is the base width (64 in
    the reference).

    Args:
      width_multiplier: m.
      cifar_stem: use the CIFAR stem (images <= 32 pixels).
      sk_ratio: > 0 selects the ResNet-D stem (ignored by the CIFAR stem).
      batch_norm_decay: BN momentum.
      global_bn: synchronised BN.
      base_width: b, the stem's output channels at m = 1 (reference 64).
      conv_backward: `Conv2DFixedPadding`'s `backward`.
      **kwargs: base layer arguments.
    """

    def __init__(
        self,
        width_multiplier: int = 1,
        cifar_stem: bool = False,
        sk_ratio: float = 0.0,
        batch_norm_decay: float = 0.9,
        global_bn: bool = True,
        base_width: int = 64,
        conv_backward: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.width_multiplier = width_multiplier
        self.cifar_stem = cifar_stem
        self.conv_backward = conv_backward
        self.sk_ratio = sk_ratio
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.base_width = base_width
        w = base_width * width_multiplier  # 64m in the reference.
        if cifar_stem:
            specs = [(w, 3, 1)]
        elif sk_ratio > 0:
            specs = [(w // 2, 3, 2), (w // 2, 3, 1), (w, 3, 1)]
        else:
            specs = [(w, 7, 2)]
        self._conv_names = set_layer_attributes(
            self,
            [
                Conv2DFixedPadding(
                    f, k, s, backward=conv_backward, name=f"conv{i}"
                )
                for i, (f, k, s) in enumerate(specs)
            ],
        )
        # One BN after every conv; the last one ends the stem.
        self._bn_names = set_layer_attributes(
            self,
            [
                batch_norm(batch_norm_decay, global_bn, name=f"bn{i}")
                for i in range(len(specs))
            ],
        )
        self.max_pool = None
        if not cifar_stem:
            self.max_pool = keras.layers.MaxPooling2D(3, 2, padding="same")
        self.out_filters = w

    @property
    def convs(self) -> list[Conv2DFixedPadding]:
        """The stem's convs, in order."""
        return [getattr(self, name) for name in self._conv_names]

    @property
    def bns(self) -> list[keras.layers.BatchNormalization]:
        """The BN after each conv."""
        return [getattr(self, name) for name in self._bn_names]

    def build(self, input_shape):
        for conv, bn in zip(self.convs, self.bns, strict=True):
            build_once(conv, input_shape)
            input_shape = (None, None, None, conv.filters)
            build_once(bn, input_shape)

    def call(
        self, inputs, training=None, activate=True
    ) -> dict[str, tf.Tensor]:
        """The endpoints; without `activate` only `initial_conv` (the
        caller applies the last BN-ReLU)."""
        x = inputs
        for conv, bn in zip(self.convs[:-1], self.bns[:-1], strict=False):
            x = tf.nn.relu(bn(conv(x), training=training))
        initial_conv = self.convs[-1](x)
        if not activate:
            return {"initial_conv": initial_conv}
        x = tf.nn.relu(self.bns[-1](initial_conv, training=training))
        if self.max_pool is not None:
            x = self.max_pool(x)
        return {"initial_conv": initial_conv, "initial_max_pool": x}

    def get_config(self):
        return {
            **super().get_config(),
            "width_multiplier": self.width_multiplier,
            "cifar_stem": self.cifar_stem,
            "sk_ratio": self.sk_ratio,
            "batch_norm_decay": self.batch_norm_decay,
            "global_bn": self.global_bn,
            "base_width": self.base_width,
            "conv_backward": self.conv_backward,
        }


@_register
class ResNet(keras.layers.Layer):
    """The SimCLR encoder: stem, 4 block groups, global average pool.

    `call(images, training)` takes (N, H, W, 3) images and returns a dict of
    the endpoints `ENDPOINTS`; `final_avg_pool` is (N, `output_dim`) in
    float32, the others are NHWC in the compute dtype.

    Freezing (`fine_tune_after_block = k >= 0`, fine-tuning only): the stem
    and block groups 1..k get `trainable = False`, so they are left out of
    `trainable_variables` and their BNs run in inference mode (keeping their
    moving statistics), and a stop-gradient after part k keeps the backward
    pass out of them. k = 4 freezes the whole encoder (linear evaluation).

    Args:
      depth: 18, 34, 50, 101, 152 or 200.
      width_multiplier: m; block widths are bm, 2bm, 4bm, 8bm (b = 64:
        64m, 128m, 256m, 512m).
      cifar_stem: use the 3x3 stride-1 stem without max-pool.
      sk_ratio: > 0 turns on selective kernels and ResNet-D (SimCLRv2).
      se_ratio: > 0 turns on squeeze-excitation.
      batch_norm_decay: BN momentum.
      global_bn: synchronise BN statistics across replicas.
      fine_tune_after_block: -1 (train all) or k in 0..4 (freeze up to k).
      base_width: b, the width of block group 1 at m = 1 (reference 64;
        32 gives a half-width network).
      zero_init_residual: gamma = 0 for the last BN of every residual
        branch (reference); False starts it at 1.
      conv_backward: how conv gradients are computed (same values;
        `Conv2DFixedPadding`'s `backward`): "auto", "tf" or "matmul".
      recompute_bn_relu: blocks keep only the conv output of
        conv-BN-ReLU-conv chains for the backward pass, and a CIFAR stem
        only its conv output (block 1 applies its BN-ReLU).
      **kwargs: base layer arguments (`name`, `dtype`, ...).

    Raises:
      ValueError: an unknown depth or `fine_tune_after_block`.
    """

    def __init__(
        self,
        depth: int = 50,
        width_multiplier: int = 1,
        cifar_stem: bool = False,
        sk_ratio: float = 0.0,
        se_ratio: float = 0.0,
        batch_norm_decay: float = 0.9,
        global_bn: bool = True,
        fine_tune_after_block: int = -1,
        base_width: int = 64,
        zero_init_residual: bool = True,
        conv_backward: str = "auto",
        recompute_bn_relu: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if depth not in BLOCKS:
            raise ValueError(
                f"Received: depth={depth}. Use one of "
                f"{', '.join(map(str, BLOCKS))}."
            )
        if not -1 <= fine_tune_after_block <= 4:
            raise ValueError(
                f"Received: fine_tune_after_block={fine_tune_after_block}. "
                "Use -1 (train everything) to 4 (freeze the whole encoder)."
            )
        self.depth = depth
        self.width_multiplier = width_multiplier
        self.cifar_stem = cifar_stem
        self.sk_ratio = sk_ratio
        self.se_ratio = se_ratio
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.fine_tune_after_block = fine_tune_after_block
        self.base_width = base_width
        self.zero_init_residual = zero_init_residual
        self.conv_backward = conv_backward
        self.recompute_bn_relu = recompute_bn_relu
        bn_kwargs = dict(
            batch_norm_decay=batch_norm_decay,
            global_bn=global_bn,
            conv_backward=conv_backward,
        )
        self.stem = Stem(
            width_multiplier,
            cifar_stem,
            sk_ratio,
            base_width=base_width,
            name="stem",
            **bn_kwargs,
        )
        block_type, num_blocks = BLOCKS[depth]
        groups = [
            BlockGroup(
                base_width * width_multiplier * 2**i,
                block_type,
                num_blocks[i],
                strides=1 if i == 0 else 2,
                sk_ratio=sk_ratio,
                se_ratio=se_ratio,
                zero_init_residual=zero_init_residual,
                recompute_bn_relu=recompute_bn_relu,
                name=f"block_group{i + 1}",
                **bn_kwargs,
            )
            for i in range(4)
        ]
        self._group_names = set_layer_attributes(self, groups)
        for part in self.parts[: fine_tune_after_block + 1]:
            part.trainable = False
        self.output_dim = self.block_groups[-1].out_filters

    @property
    def block_groups(self) -> list[BlockGroup]:
        """block_group1 ... block_group4."""
        return [getattr(self, name) for name in self._group_names]

    @property
    def parts(self) -> list[keras.layers.Layer]:
        """[stem, block_group1, ..., block_group4]: part k is frozen by k."""
        return [self.stem, *self.block_groups]

    def build(self, input_shape):
        build_once(self.stem, input_shape)
        shape = (None, None, None, self.stem.out_filters)
        for group in self.block_groups:
            build_once(group, shape)
            shape = (None, None, None, group.out_filters)

    def _stem_bn_for_group1(self, inputs, training):
        """The stem's last BN when block group 1 applies the stem's last
        BN-ReLU itself, else None.

        A CIFAR stem (no max-pool) feeds the first block's conv1 and
        projection shortcut only; that block then keeps just the stem's
        conv output for the backward pass (`bn_relu_branches`), one
        activation less. Needs what the recomputation needs: training, a
        trainable stem, `recompute_bn_relu`, custom conv gradients and
        the fused batch norm.
        """
        bn = self.stem.bns[-1]
        recomputes = self.recompute_bn_relu and self.conv_backward != "tf"
        if not (
            recomputes
            and self.stem.max_pool is None
            and self.fine_tune_after_block != 0
            and self.block_groups[0].blocks[0].takes_input_bn
        ):
            return None
        # The check reads only the rank and channel axis of a tensor.
        return bn if bn._fused_training(inputs, training, None) else None

    def call(self, inputs, training=None) -> dict[str, tf.Tensor]:
        stem_bn = self._stem_bn_for_group1(inputs, training)
        endpoints = self.stem(
            inputs, training=training, activate=stem_bn is None
        )
        if stem_bn is None:
            x = endpoints["initial_max_pool"]
            if self.fine_tune_after_block == 0:
                x = tf.stop_gradient(x)
        else:
            # The value block group 1 sees, without a second statistics
            # update (unused in a training step, so never computed there).
            x = endpoints["initial_conv"]
            scale, offset = stem_bn.scale_and_offset(x.shape[-1])
            y = fused_batch_norm(x, scale, offset, stem_bn.epsilon)[0]
            endpoints["initial_max_pool"] = tf.nn.relu(y)
        for i, group in enumerate(self.block_groups, start=1):
            x = group(
                x, training=training, input_bn=stem_bn if i == 1 else None
            )
            if self.fine_tune_after_block == i:
                x = tf.stop_gradient(x)
            endpoints[f"block_group{i}"] = x
        # Pool in float32: it is the representation handed to the heads.
        endpoints["final_avg_pool"] = tf.reduce_mean(
            tf.cast(x, tf.float32), axis=[1, 2]
        )  # (N, output_dim)
        return endpoints

    def get_config(self):
        return {
            **super().get_config(),
            "depth": self.depth,
            "width_multiplier": self.width_multiplier,
            "cifar_stem": self.cifar_stem,
            "sk_ratio": self.sk_ratio,
            "se_ratio": self.se_ratio,
            "batch_norm_decay": self.batch_norm_decay,
            "global_bn": self.global_bn,
            "fine_tune_after_block": self.fine_tune_after_block,
            "base_width": self.base_width,
            "zero_init_residual": self.zero_init_residual,
            "conv_backward": self.conv_backward,
            "recompute_bn_relu": self.recompute_bn_relu,
        }
