"""Fixtures in the layouts of the reference SimCLR TF2 code (test helper).

`layout(...)` lists the variables the reference `tf2/` code creates for an
architecture -- object path in its training checkpoint, Keras-2 variable
name (with the creation counters of one fresh process) and shape -- as
measured in /work/shared/reference_checkpoints/*.json. `write_checkpoint`
and `write_saved_model` write them in the two reference formats; the
SavedModel computes with `tests.reference_forward`.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import tensorflow as tf

from tests import reference_forward

BLOCKS = reference_forward.BLOCKS
BN_LEAVES = ("gamma", "beta", "moving_mean", "moving_variance")


@dataclasses.dataclass
class Arch:
    depth: int = 18
    width: int = 1
    sk: bool = False
    se_ratio: float = 0.0
    cifar: bool = True
    num_classes: int | None = 10
    global_bn: bool = True
    base: int = 64
    proj_layers: int = 3
    proj_out: int = 128


@dataclasses.dataclass
class Var:
    path: str  # object path below `model/` in the training checkpoint
    name: str  # Keras-2 variable name (`full_name`)
    shape: tuple


class _Counters:
    """Keras-2 unique names; `offset` layers of each kind made before."""

    def __init__(self, offset: int = 0):
        self.counts = collections.Counter()
        self.offset = offset

    def __call__(self, base: str) -> str:
        n = self.counts[base] + self.offset
        self.counts[base] += 1
        return base if n == 0 else f"{base}_{n}"


class _Builder:
    def __init__(self, arch: Arch, offset: int = 0):
        self.arch = arch
        self.n = _Counters(offset)
        self.vars: list[Var] = []

    def conv(self, path, scope, shape, raw=False):
        if raw:
            name = f"{scope}/{self.n('conv2d')}/kernel"
        else:
            name = f"{scope}/{self.n('conv2d_fixed_padding')}/"
            name += f"{self.n('conv2d')}/kernel"
        self.vars.append(Var(f"{path}/kernel", name, tuple(shape)))

    def bn(self, path, scope, dim, center=True):
        kind = "sync_batch_normalization"
        if not self.arch.global_bn:
            kind = "batch_normalization"
        prefix = f"{scope}/{self.n('batch_norm_relu')}/{self.n(kind)}"
        for leaf in BN_LEAVES:
            if leaf == "beta" and not center:
                continue
            self.vars.append(Var(f"{path}/{leaf}", f"{prefix}/{leaf}", (dim,)))

    def stem(self):
        a, p, s = self.arch, "resnet_model/initial_conv_relu_max_pool", "resnet"
        c = a.base * a.width
        if a.cifar or not a.sk:
            k = 3 if a.cifar else 7
            self.conv(f"{p}/0/conv2d", s, (k, k, 3, c))
            self.bn(f"{p}/2/bn", s, c)
            return c
        dims = [(3, c // 2), (c // 2, c // 2), (c // 2, c)]
        for i, (cin, cout) in enumerate(dims):
            self.conv(f"{p}/{2 * i}/conv2d", s, (3, 3, cin, cout))
            self.bn(f"{p}/{2 * i + 1 if i < 2 else 6}/bn", s, cout)
        return c

    def shortcut(self, path, scope, cin, cout, stride, listname):
        first = 0 if not self.arch.sk else (2 if stride > 1 else 1)
        self.conv(f"{path}/{listname}/{first}/conv2d", scope, (1, 1, cin, cout))
        self.bn(f"{path}/{listname}/{first + 1}/bn", scope, cout)

    def sk_conv(self, path, scope, cin, f):
        scope = f"{scope}/{self.n('sk__conv2d')}"
        mid = max(int(f * 0.0625), 32)
        self.conv(
            f"{path}/conv2d_fixed_padding/conv2d", scope, (3, 3, cin, 2 * f)
        )
        self.bn(f"{path}/batch_norm_relu/bn", scope, 2 * f)
        self.conv(f"{path}/conv2d_0", scope, (1, 1, f, mid), raw=True)
        self.bn(f"{path}/batch_norm_relu_1/bn", scope, mid)
        self.conv(f"{path}/conv2d_1", scope, (1, 1, mid, 2 * f), raw=True)

    def se(self, path, scope, f, cout):
        scope = f"{scope}/{self.n('se__layer')}"
        r = max(1, int(f * self.arch.se_ratio))
        for leaf, shape in (("reduce", (cout, r)), ("expand", (r, cout))):
            kernel = f"{scope}/{self.n('conv2d')}"
            self.vars.append(
                Var(
                    f"{path}/se_layer/se_{leaf}/kernel",
                    f"{kernel}/kernel",
                    (1, 1, *shape),
                )
            )
            self.vars.append(
                Var(
                    f"{path}/se_layer/se_{leaf}/bias",
                    f"{kernel}/bias",
                    (shape[1],),
                )
            )

    def block(self, g, b, cin, f, stride, kind):
        path = f"resnet_model/block_groups/{g}/layers/{b}"
        base = "residual_block" if kind == "basic" else "bottleneck_block"
        scope = f"resnet/block_group{g + 1}/{self.n(base)}"
        cout = f if kind == "basic" else 4 * f
        if kind == "basic":
            if b == 0:
                self.shortcut(path, scope, cin, cout, stride, "shortcut_layers")
            p = f"{path}/conv2d_bn_layers"
            self.conv(f"{p}/0/conv2d", scope, (3, 3, cin, f))
            self.bn(f"{p}/1/bn", scope, f)
            self.conv(f"{p}/2/conv2d", scope, (3, 3, f, f))
            self.bn(f"{p}/3/bn", scope, f)
        else:
            if b == 0:
                self.shortcut(
                    path, scope, cin, cout, stride, "projection_layers"
                )
            p = f"{path}/conv_relu_dropblock_layers"
            self.conv(f"{p}/0/conv2d", scope, (1, 1, cin, f))
            self.bn(f"{p}/1/bn", scope, f)
            if self.arch.sk:
                self.sk_conv(f"{p}/3", scope, f, f)
                last = 5
            else:
                self.conv(f"{p}/3/conv2d", scope, (3, 3, f, f))
                self.bn(f"{p}/4/bn", scope, f)
                last = 6
            self.conv(f"{p}/{last}/conv2d", scope, (1, 1, f, cout))
            self.bn(f"{p}/{last + 1}/bn", scope, cout)
        if self.arch.se_ratio > 0:
            self.se(path, scope, f, cout)
        return cout

    def heads(self, dim):
        a = self.arch
        for j in range(a.proj_layers):
            last = j == a.proj_layers - 1
            out = a.proj_out if last else dim
            p, s = (
                f"_projection_head/linear_layers/{j}",
                f"projection_head/nl_{j}",
            )
            self.bn(f"{p}/bn_relu/bn", s, out, center=not last)
            self.vars.append(
                Var(
                    f"{p}/dense/kernel",
                    f"{s}/{self.n('dense')}/kernel",
                    (dim, out),
                )
            )
            dim = out
        if a.num_classes:
            d = self.n("dense")
            s = f"head_supervised/linear_layer/{d}"
            feat = self.feature_dim
            for leaf, shape in (
                ("kernel", (feat, a.num_classes)),
                ("bias", (a.num_classes,)),
            ):
                self.vars.append(
                    Var(
                        f"supervised_head/linear_layer/dense/{leaf}",
                        f"{s}/{leaf}",
                        shape,
                    )
                )


def layout(arch: Arch, offset: int = 0) -> list[Var]:
    """Every model variable of the reference for `arch`, in creation order.

    `offset` > 0 names them as in a process that built `offset` layers of
    each kind before (e.g. `conv2d_fixed_padding_3` for the first conv).
    """
    b = _Builder(arch, offset)
    cin = b.stem()
    kind, blocks = BLOCKS[arch.depth]
    for g, n in enumerate(blocks):
        f = arch.base * arch.width * 2**g
        for i in range(n):
            cin = b.block(
                g, i, cin, f, (1 if g == 0 else 2) if i == 0 else 1, kind
            )
    b.feature_dim = cin
    b.heads(cin)
    return b.vars


def random_values(variables: list[Var], seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible weights: fan-in scaled kernels, BN stats away from 0/1."""
    rng = np.random.default_rng(seed)
    values = {}
    for v in variables:
        leaf = v.path.rsplit("/", 1)[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(v.shape[:-1]))
            x = rng.normal(0, 1.0 / np.sqrt(fan_in), v.shape)
        elif leaf == "moving_variance":
            x = rng.uniform(0.5, 1.5, v.shape)
        elif leaf == "gamma":
            x = rng.uniform(0.5, 1.5, v.shape)
        else:
            x = rng.normal(0, 0.1, v.shape)
        values[v.path] = x.astype(np.float32)
    return values


def _tree(variables: list[Var], values: dict, with_lists: bool):
    """Trackables whose attribute paths are the reference object paths.

    Numeric path parts become lists (ListWrapper children "0", "1", ...),
    as the reference's Python lists of layers. With `with_lists`, the
    `resnet_model` and `_projection_head` nodes also get the `variables`
    list a Keras-2 layer has, which the SavedModel serialiser prefers.
    """
    root = tf.__internal__.tracking.AutoTrackable()
    made = {}
    for v in variables:
        var = tf.Variable(
            values[v.path],
            name=v.name,
            trainable=not v.path.endswith(("moving_mean", "moving_variance")),
        )
        made[v.path] = var
        node = root
        parts = v.path.split("/")
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                idx = int(part)
                while len(node) <= idx:
                    node.append(tf.__internal__.tracking.AutoTrackable())
                node = node[idx]
                continue
            if not hasattr(node, part):
                child = [] if nxt.isdigit() else None
                setattr(
                    node,
                    part,
                    child
                    if child is not None
                    else tf.__internal__.tracking.AutoTrackable(),
                )
            node = getattr(node, part)
        setattr(node, parts[-1], var)
    if with_lists:
        for top in ("resnet_model", "_projection_head"):
            getattr(root, top).variables = [
                made[p] for p in made if p.startswith(top)
            ]
    return root, made


def write_checkpoint(variables, values, directory: str, step: int) -> str:
    """A reference training checkpoint `directory/ckpt-<step>`."""
    model, _ = _tree(variables, values, with_lists=False)
    ckpt = tf.train.Checkpoint(
        model=model, global_step=tf.Variable(step, dtype=tf.int64)
    )
    manager = tf.train.CheckpointManager(ckpt, directory, max_to_keep=1)
    return manager.save(checkpoint_number=step)


def write_saved_model(arch: Arch, variables, values, directory: str) -> None:
    """A SavedModel as the reference `save()` writes: `__call__(inputs,
    trainable)` traced for both values, returning the endpoint dict, no
    signatures; inference runs `reference_forward.forward` over the
    module's variables."""
    model, made = _tree(variables, values, with_lists=True)
    module = tf.Module()
    module.model = model
    module.trainable_variables_list = [v for v in made.values() if v.trainable]

    @tf.function
    def call(inputs, trainable):
        del trainable  # Fixtures are for inference only.
        return reference_forward.forward(arch, made, inputs)

    module.__call__ = call
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    call.get_concrete_function(spec, True)
    call.get_concrete_function(spec, False)
    tf.saved_model.save(module, directory)
