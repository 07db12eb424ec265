"""The reference forward pass in inference mode (test helper).

An independent implementation of the reference SimCLR TF2 model
(SPEC.md §3-4) in plain TF ops over the variables of
`tests.reference_layout.layout`, keyed by their object paths in the
reference training checkpoint.
"""

from __future__ import annotations

import tensorflow as tf

BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


def _conv(x, kernel, stride=1):
    if stride == 1:
        return tf.nn.conv2d(x, kernel, 1, "SAME")
    total = kernel.shape[0] - 1
    lo = total // 2
    x = tf.pad(x, [[0, 0], [lo, total - lo], [lo, total - lo], [0, 0]])
    return tf.nn.conv2d(x, kernel, stride, "VALID")


def _bn(x, p, prefix, relu):
    beta = p.get(f"{prefix}/beta", 0.0)
    y = (x - p[f"{prefix}/moving_mean"]) / tf.sqrt(
        p[f"{prefix}/moving_variance"] + 1e-5
    ) * p[f"{prefix}/gamma"] + beta
    return tf.nn.relu(y) if relu else y


def _shortcut(arch, p, path, x, stride, listname):
    if arch.sk:
        if stride > 1:
            x = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])
            x = tf.nn.avg_pool2d(x, 2, stride, "VALID")
        else:
            x = tf.nn.avg_pool2d(x, 2, 1, "SAME")
        first, stride = (2 if stride > 1 else 1), 1
    else:
        first = 0
    x = _conv(x, p[f"{path}/{listname}/{first}/conv2d/kernel"], stride)
    return _bn(x, p, f"{path}/{listname}/{first + 1}/bn", relu=False)


def _sk(p, path, x, stride):
    x = _conv(x, p[f"{path}/conv2d_fixed_padding/conv2d/kernel"], stride)
    x = _bn(x, p, f"{path}/batch_norm_relu/bn", relu=True)
    branches = tf.stack(tf.split(x, 2, axis=-1))  # (2, N, H, W, f)
    pooled = tf.reduce_mean(tf.reduce_sum(branches, 0), [1, 2], keepdims=True)
    mix = _conv(pooled, p[f"{path}/conv2d_0/kernel"])
    mix = _bn(mix, p, f"{path}/batch_norm_relu_1/bn", relu=True)
    mix = _conv(mix, p[f"{path}/conv2d_1/kernel"])
    weights = tf.nn.softmax(tf.stack(tf.split(mix, 2, axis=-1)), axis=0)
    return tf.reduce_sum(branches * weights, 0)


def _se(p, path, x):
    s = tf.reduce_mean(x, [1, 2], keepdims=True)
    s = _conv(s, p[f"{path}/se_layer/se_reduce/kernel"])
    s = tf.nn.relu(s + p[f"{path}/se_layer/se_reduce/bias"])
    s = _conv(s, p[f"{path}/se_layer/se_expand/kernel"])
    return tf.sigmoid(s + p[f"{path}/se_layer/se_expand/bias"]) * x


def _block(arch, p, g, b, x, stride, kind):
    path = f"resnet_model/block_groups/{g}/layers/{b}"
    listname = "shortcut_layers" if kind == "basic" else "projection_layers"
    sc = _shortcut(arch, p, path, x, stride, listname) if b == 0 else x
    if kind == "basic":
        q = f"{path}/conv2d_bn_layers"
        y = _bn(_conv(x, p[f"{q}/0/conv2d/kernel"], stride), p, f"{q}/1/bn", 1)
        y = _bn(_conv(y, p[f"{q}/2/conv2d/kernel"]), p, f"{q}/3/bn", 0)
    else:
        q = f"{path}/conv_relu_dropblock_layers"
        y = _bn(_conv(x, p[f"{q}/0/conv2d/kernel"]), p, f"{q}/1/bn", 1)
        if arch.sk:
            y, last = _sk(p, f"{q}/3", y, stride), 5
        else:
            y = _conv(y, p[f"{q}/3/conv2d/kernel"], stride)
            y, last = _bn(y, p, f"{q}/4/bn", 1), 6
        y = _conv(y, p[f"{q}/{last}/conv2d/kernel"])
        y = _bn(y, p, f"{q}/{last + 1}/bn", 0)
    if arch.se_ratio > 0:
        y = _se(p, path, y)
    return tf.nn.relu(y + sc)


def _stem(arch, p, x):
    s = "resnet_model/initial_conv_relu_max_pool"
    if arch.cifar or not arch.sk:
        conv = _conv(x, p[f"{s}/0/conv2d/kernel"], 1 if arch.cifar else 2)
        y = _bn(conv, p, f"{s}/2/bn", True)
    else:
        y = _bn(_conv(x, p[f"{s}/0/conv2d/kernel"], 2), p, f"{s}/1/bn", 1)
        y = _bn(_conv(y, p[f"{s}/2/conv2d/kernel"]), p, f"{s}/3/bn", 1)
        conv = _conv(y, p[f"{s}/4/conv2d/kernel"])
        y = _bn(conv, p, f"{s}/6/bn", True)
    if not arch.cifar:
        y = tf.nn.max_pool2d(y, 3, 2, "SAME")
    return conv, y


def forward(arch, params, images) -> dict:
    """The reference endpoints for `images` (inference mode); `arch` is a
    `tests.reference_layout.Arch`."""
    p = {k: tf.convert_to_tensor(v) for k, v in params.items()}
    out = {}
    out["initial_conv"], x = _stem(arch, p, images)
    out["initial_max_pool"] = x
    kind, blocks = BLOCKS[arch.depth]
    for g, n in enumerate(blocks):
        for b in range(n):
            stride = (1 if g == 0 else 2) if b == 0 else 1
            x = _block(arch, p, g, b, x, stride, kind)
        out[f"block_group{g + 1}"] = x
    h = tf.reduce_mean(x, [1, 2])
    out["final_avg_pool"] = out["proj_head_input"] = h
    hiddens = [h]
    for j in range(arch.proj_layers):
        q = f"_projection_head/linear_layers/{j}"
        last = j == arch.proj_layers - 1
        y = _bn(hiddens[-1] @ p[f"{q}/dense/kernel"], p, f"{q}/bn_relu/bn", 0)
        hiddens.append(y if last else tf.nn.relu(y))
    out["proj_head_output"] = hiddens[-1]
    if arch.num_classes:
        q = "supervised_head/linear_layer/dense"
        out["logits_sup"] = hiddens[0] @ p[f"{q}/kernel"] + p[f"{q}/bias"]
    return out
