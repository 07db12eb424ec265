"""Residual blocks and block groups of the SimCLR ResNet (SPEC.md §3).

Basic (ResNet-18/34) and bottleneck (ResNet-50 and deeper) blocks with the
reference `tf2/resnet.py`'s choices: the stride on the bottleneck's 3x3
conv (v1.5), a projection shortcut on every group's first block (ResNet-D
average-pool + 1x1 conv with selective kernels), the last BN of the
residual branch starting at gamma = 0, optional selective kernels and
squeeze-excitation. `BlockGroup` stacks them; `resnet.ResNet` stacks the
groups after its stem. Under `recompute_bn_relu` the blocks keep fewer
activations for the backward pass (`simclr_tf.models.recompute`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf.models.layers import (
    Conv2DFixedPadding,
    SelectiveKernelConv,
    SqueezeExcitation,
    batch_norm,
    build_once,
    set_layer_attributes,
)
from simclr_tf.models.recompute import (
    bn_relu_branches,
    bn_relu_conv,
    conv_bn,
)

_register = keras.saving.register_keras_serializable(package="simclr_tf")


class _Block(keras.layers.Layer):
    """What basic and bottleneck blocks share: shortcut, SE, config.

    Args:
      filters: width of the block (output = filters * expansion).
      strides: spatial stride of the block.
      use_projection: use a 1x1 conv + BN shortcut (first block of a group).
      sk_ratio: > 0 turns on ResNet-D shortcuts (and, in bottlenecks,
        selective kernels).
      se_ratio: > 0 adds squeeze-excitation after the last BN.
      batch_norm_decay: BN momentum.
      global_bn: synchronised BN.
      zero_init_residual: start the last BN of the residual branch with
        gamma = 0 (reference); False starts it at 1.
      conv_backward: the convs' gradient formulation
        (`Conv2DFixedPadding`'s `backward`).
      recompute_bn_relu: keep only the conv output of conv-BN-ReLU-conv
        chains for the backward pass (`recompute.bn_relu_conv`), and
        recompute the projection shortcut's conv (`recompute.conv_bn`);
        with `input_bn` (`call`), the block applies that BN-ReLU to its
        input itself and keeps only the input (`_first_convs`).
      **kwargs: base layer arguments.
    """

    expansion = 1

    def __init__(
        self,
        filters: int,
        strides: int = 1,
        use_projection: bool = False,
        sk_ratio: float = 0.0,
        se_ratio: float = 0.0,
        batch_norm_decay: float = 0.9,
        global_bn: bool = True,
        zero_init_residual: bool = True,
        conv_backward: str = "auto",
        recompute_bn_relu: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.zero_init_residual = zero_init_residual
        self.conv_backward = conv_backward
        self.recompute_bn_relu = recompute_bn_relu
        self.filters = filters
        self.strides = strides
        self.use_projection = use_projection
        self.sk_ratio = sk_ratio
        self.se_ratio = se_ratio
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn
        self.out_filters = filters * self.expansion
        self.shortcut_pool = None
        self.shortcut_conv = None
        self.shortcut_bn = None
        if use_projection:
            if sk_ratio > 0:
                # ResNet-D: average-pool with the stride, then a 1x1 conv.
                self.shortcut_pool = keras.layers.AveragePooling2D(
                    2, strides, padding="same" if strides == 1 else "valid"
                )
                self.shortcut_conv = self._conv(
                    self.out_filters, 1, 1, name="shortcut_conv"
                )
            else:
                self.shortcut_conv = self._conv(
                    self.out_filters, 1, strides, name="shortcut_conv"
                )
            self.shortcut_bn = self._bn(name="shortcut_bn")
        self.se = None
        if se_ratio > 0:
            self.se = SqueezeExcitation(
                self.out_filters, max(1, int(filters * se_ratio)), name="se"
            )

    def _conv(self, filters: int, k: int, strides: int, name: str):
        return Conv2DFixedPadding(
            filters, k, strides, backward=self.conv_backward, name=name
        )

    def _bn(self, zero_gamma: bool = False, name: str | None = None):
        return batch_norm(
            self.batch_norm_decay, self.global_bn, zero_gamma, name=name
        )

    def _build_shortcut_and_se(self, input_shape) -> None:
        if self.shortcut_conv is not None:
            build_once(self.shortcut_conv, input_shape)
            build_once(self.shortcut_bn, (None, None, None, self.out_filters))
        if self.se is not None:
            build_once(self.se, (None, None, None, self.out_filters))

    def _shortcut(self, inputs, training):
        if self.shortcut_conv is None:
            return inputs
        x = inputs
        if self.shortcut_pool is not None:
            if self.strides > 1:
                # Reference: FixedPadding(2) = pad 0 before, 1 after.
                x = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])
            x = self.shortcut_pool(x)
        return conv_bn(
            x,
            self.shortcut_conv,
            self.shortcut_bn,
            training,
            self.recompute_bn_relu,
        )

    @property
    def takes_input_bn(self) -> bool:
        """Whether `call` can take `input_bn`: only a plain projection
        shortcut and conv1 read the input."""
        return self.shortcut_conv is not None and self.shortcut_pool is None

    def _first_convs(self, inputs, training, input_bn):
        """(conv1 output, shortcut) of the block input, which is
        relu(input_bn(inputs)) when `input_bn` is given: that BN-ReLU is
        then recomputed in the backward pass (`bn_relu_branches`)."""
        if input_bn is None:
            return self.conv1(inputs), self._shortcut(inputs, training)
        if not self.takes_input_bn:
            raise ValueError(
                f"Block {self.name} reads its input outside conv1 and a "
                "plain projection shortcut: it cannot take input_bn."
            )
        return bn_relu_branches(
            inputs,
            input_bn,
            [(self.conv1, None), (self.shortcut_conv, self.shortcut_bn)],
            training,
            self.recompute_bn_relu,
        )

    def _merge(self, residual, shortcut):
        if self.se is not None:
            residual = self.se(residual)
        return tf.nn.relu(residual + shortcut)

    def compute_output_shape(self, input_shape):
        spatial = list(input_shape[1:3])
        for i, size in enumerate(spatial):
            if size is not None:
                spatial[i] = -(-size // self.strides)
        return (input_shape[0], *spatial, self.out_filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "strides": self.strides,
            "use_projection": self.use_projection,
            "sk_ratio": self.sk_ratio,
            "se_ratio": self.se_ratio,
            "batch_norm_decay": self.batch_norm_decay,
            "global_bn": self.global_bn,
            "zero_init_residual": self.zero_init_residual,
            "conv_backward": self.conv_backward,
            "recompute_bn_relu": self.recompute_bn_relu,
        }


@_register
class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34), reference `ResidualBlock`.

    Selective kernels do not apply here; `sk_ratio > 0` only switches the
    projection shortcut to ResNet-D. Arguments as in `_Block`.
    """

    expansion = 1

    def __init__(self, filters: int, strides: int = 1, **kwargs):
        super().__init__(filters, strides, **kwargs)
        self.conv1 = self._conv(filters, 3, strides, name="conv1")
        self.bn1 = self._bn(name="bn1")
        self.conv2 = self._conv(filters, 3, 1, name="conv2")
        self.bn2 = self._bn(zero_gamma=self.zero_init_residual, name="bn2")

    def build(self, input_shape):
        width = (None, None, None, self.filters)
        build_once(self.conv1, input_shape)
        build_once(self.bn1, width)
        build_once(self.conv2, width)
        build_once(self.bn2, width)
        self._build_shortcut_and_se(input_shape)

    def call(self, inputs, training=None, input_bn=None):
        x, shortcut = self._first_convs(inputs, training, input_bn)
        x = bn_relu_conv(
            x, self.bn1, self.conv2, training, self.recompute_bn_relu
        )
        x = self.bn2(x, training=training)
        return self._merge(x, shortcut)


@_register
class BottleneckBlock(_Block):
    """1x1 -> 3x3 (strided; SK when sk_ratio > 0) -> 1x1 (x4 channels).

    Reference `BottleneckBlock` (without DropBlock, which SimCLR never
    enables). Arguments as in `_Block`.
    """

    expansion = 4

    def __init__(self, filters: int, strides: int = 1, **kwargs):
        super().__init__(filters, strides, **kwargs)
        self.conv1 = self._conv(filters, 1, 1, name="conv1")
        self.bn1 = self._bn(name="bn1")
        if self.sk_ratio > 0:
            self.sk_conv = SelectiveKernelConv(
                filters,
                strides,
                self.sk_ratio,
                self.batch_norm_decay,
                self.global_bn,
                name="sk_conv",
            )
            self.conv2 = self.bn2 = None
        else:
            self.sk_conv = None
            self.conv2 = self._conv(filters, 3, strides, name="conv2")
            self.bn2 = self._bn(name="bn2")
        self.conv3 = self._conv(self.out_filters, 1, 1, name="conv3")
        self.bn3 = self._bn(zero_gamma=self.zero_init_residual, name="bn3")

    def build(self, input_shape):
        width = (None, None, None, self.filters)
        build_once(self.conv1, input_shape)
        build_once(self.bn1, width)
        if self.sk_conv is not None:
            build_once(self.sk_conv, width)
        else:
            build_once(self.conv2, width)
            build_once(self.bn2, width)
        build_once(self.conv3, width)
        build_once(self.bn3, (None, None, None, self.out_filters))
        self._build_shortcut_and_se(input_shape)

    def call(self, inputs, training=None, input_bn=None):
        x, shortcut = self._first_convs(inputs, training, input_bn)
        if self.sk_conv is not None:
            x = tf.nn.relu(self.bn1(x, training=training))
            x = self.sk_conv(x, training=training)
            x = self.conv3(x)
        else:
            recompute = self.recompute_bn_relu
            x = bn_relu_conv(x, self.bn1, self.conv2, training, recompute)
            x = bn_relu_conv(x, self.bn2, self.conv3, training, recompute)
        x = self.bn3(x, training=training)
        return self._merge(x, shortcut)


_BLOCK_TYPES = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


@_register
class BlockGroup(keras.layers.Layer):
    """`num_blocks` blocks; the first has the stride and a projection.

    Args:
      filters: block width.
      block_type: "basic" or "bottleneck".
      num_blocks: number of blocks.
      strides: stride of the first block.
      **kwargs: `sk_ratio`, `se_ratio`, `batch_norm_decay`, `global_bn`,
        `zero_init_residual`, `conv_backward`, `recompute_bn_relu` for the
        blocks; the rest goes to the base layer.
    """

    def __init__(
        self,
        filters: int,
        block_type: str,
        num_blocks: int,
        strides: int,
        sk_ratio: float = 0.0,
        se_ratio: float = 0.0,
        batch_norm_decay: float = 0.9,
        global_bn: bool = True,
        zero_init_residual: bool = True,
        conv_backward: str = "auto",
        recompute_bn_relu: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if block_type not in _BLOCK_TYPES:
            raise ValueError(
                f"Received: block_type={block_type!r}. Use one of "
                f"{', '.join(_BLOCK_TYPES)}."
            )
        self.filters = filters
        self.block_type = block_type
        self.num_blocks = num_blocks
        self.strides = strides
        self.block_kwargs = dict(
            sk_ratio=sk_ratio,
            se_ratio=se_ratio,
            batch_norm_decay=batch_norm_decay,
            global_bn=global_bn,
            zero_init_residual=zero_init_residual,
            conv_backward=conv_backward,
            recompute_bn_relu=recompute_bn_relu,
        )
        block_cls = _BLOCK_TYPES[block_type]
        self._block_names = set_layer_attributes(
            self,
            [
                block_cls(
                    filters,
                    strides if i == 0 else 1,
                    use_projection=i == 0,
                    name=f"block{i + 1}",
                    **self.block_kwargs,
                )
                for i in range(num_blocks)
            ],
        )
        self.out_filters = self.blocks[0].out_filters

    @property
    def blocks(self) -> list[_Block]:
        """The blocks, in order."""
        return [getattr(self, name) for name in self._block_names]

    def build(self, input_shape):
        for block in self.blocks:
            build_once(block, input_shape)
            input_shape = (None, None, None, block.out_filters)

    def call(self, inputs, training=None, input_bn=None):
        """`input_bn`: the first block's (`_Block._first_convs`)."""
        x = self.blocks[0](inputs, training=training, input_bn=input_bn)
        for block in self.blocks[1:]:
            x = block(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return self.blocks[0].compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "block_type": self.block_type,
            "num_blocks": self.num_blocks,
            "strides": self.strides,
            **self.block_kwargs,
        }
