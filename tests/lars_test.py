"""LARS against hand-computed NumPy updates (SPEC.md §6); exclusion sets."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import lars
from simclr_tf.models import simclr_model
from tests.helpers import two_replica_strategy

LR, MOMENTUM, WD, EETA = 0.5, 0.9, 0.1, 0.01


def np_lars(params, grads_per_step, excluded, *, classic=True, nesterov=False):
    """LARS written from SPEC.md §6 (and the reference for non-classic)."""
    params = [np.array(p, np.float64) for p in params]
    slots = [np.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(params, grads, strict=True)):
            g = np.array(g, np.float64)
            if i not in excluded:
                g = g + WD * w

            def trust(d, i=i, w=w):
                wn, dn = np.linalg.norm(w), np.linalg.norm(d)
                if i in excluded or wn == 0 or dn == 0:
                    return 1.0
                return EETA * wn / dn

            if classic:
                scaled = LR * trust(g)
                slots[i] = MOMENTUM * slots[i] + scaled * g
                update = slots[i]
                if nesterov:
                    update = MOMENTUM * slots[i] + scaled * g
            else:
                slots[i] = MOMENTUM * slots[i] + g
                update = slots[i]
                if nesterov:
                    update = MOMENTUM * slots[i] + g
                update = LR * trust(update) * update
            params[i] = w - update
    return params


def _toy(seed=0):
    rng = np.random.default_rng(seed)
    init = [
        rng.normal(size=(3, 4)),  # kernel: decayed and adapted
        rng.normal(size=(4,)),  # bias: excluded
        np.zeros((2, 2)),  # zero weights: trust ratio 1
        rng.normal(size=(5,)),  # excluded (e.g. BN gamma)
    ]
    grads = [[rng.normal(size=p.shape) for p in init] for _ in range(5)]
    grads[2][0] = np.zeros((3, 4))  # a zero gradient at step 3
    return init, grads


@pytest.mark.parametrize(
    "classic,nesterov", [(True, False), (True, True), (False, False)]
)
def test_five_steps_match_hand_computed_updates(classic, nesterov):
    init, grads = _toy()
    variables = [keras.Variable(p.astype(np.float32)) for p in init]
    excluded = {1, 3}
    opt = lars.LARS(
        LR,
        momentum=MOMENTUM,
        weight_decay=WD,
        eeta=EETA,
        classic_momentum=classic,
        use_nesterov=nesterov,
        exclude_from_weight_decay=[variables[i] for i in excluded],
    )
    for step_grads in grads:
        opt.apply([tf.constant(g, tf.float32) for g in step_grads], variables)
    want = np_lars(init, grads, excluded, classic=classic, nesterov=nesterov)
    for v, w in zip(variables, want, strict=True):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-6)
    assert int(opt.iterations.numpy()) == 5


def test_separate_adaptation_exclusions():
    init, grads = _toy(seed=1)
    variables = [keras.Variable(p.astype(np.float32)) for p in init]
    opt = lars.LARS(
        LR,
        momentum=MOMENTUM,
        weight_decay=WD,
        eeta=EETA,
        exclude_from_weight_decay=[],
        exclude_from_layer_adaptation=[variables[0]],
    )
    opt.apply([tf.constant(g, tf.float32) for g in grads[0]], variables)
    # Variable 0: decayed but no trust ratio.
    g0 = grads[0][0] + WD * init[0]
    np.testing.assert_allclose(
        variables[0].numpy(), init[0] - LR * g0, rtol=1e-5
    )
    # Variable 1: decayed and adapted.
    g1 = grads[0][1] + WD * init[1]
    trust = EETA * np.linalg.norm(init[1]) / np.linalg.norm(g1)
    np.testing.assert_allclose(
        variables[1].numpy(), init[1] - LR * trust * g1, rtol=1e-5
    )


def test_config_round_trip_and_validation():
    opt = lars.LARS(0.1, momentum=0.8, weight_decay=1e-4, eeta=0.002)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, lars.LARS)
    config = restored.get_config()
    assert config["momentum"] == 0.8 and config["eeta"] == 0.002
    assert config["weight_decay"] == 1e-4 and config["classic_momentum"]
    with pytest.raises(ValueError, match="momentum=1.5"):
        lars.LARS(0.1, momentum=1.5)


def test_checkpoint_restores_momentum(tmp_path):
    init, grads = _toy(seed=2)

    def make():
        variables = [keras.Variable(p.astype(np.float32)) for p in init]
        opt = lars.LARS(LR, weight_decay=WD, eeta=EETA)
        opt.build(variables)
        return variables, opt

    variables, opt = make()
    for g in grads[:2]:
        opt.apply([tf.constant(x, tf.float32) for x in g], variables)
    path = tf.train.Checkpoint(opt=opt, v=variables).write(str(tmp_path / "c"))
    opt.apply([tf.constant(x, tf.float32) for x in grads[2]], variables)

    variables2, opt2 = make()
    tf.train.Checkpoint(opt=opt2, v=variables2).read(path).assert_consumed()
    assert int(opt2.iterations.numpy()) == 2
    opt2.apply([tf.constant(x, tf.float32) for x in grads[2]], variables2)
    for a, b in zip(variables, variables2, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_mirrored_strategy_sums_replica_gradients():
    init, grads = _toy(seed=3)
    strategy = two_replica_strategy()
    with strategy.scope():
        variables = [keras.Variable(p.astype(np.float32)) for p in init]
        opt = lars.LARS(
            LR,
            weight_decay=WD,
            eeta=EETA,
            exclude_from_weight_decay=[variables[1]],
        )
        opt.build(variables)
    # Replica r gets gradient g * (r + 1); the update uses 3 * g.
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: [
            tf.constant(g * (ctx.replica_id_in_sync_group + 1), tf.float32)
            for g in grads[0]
        ]
    )

    @tf.function
    def step(g):
        strategy.run(lambda g: opt.apply(g, variables), args=(g,))

    step(per_replica)
    step(per_replica)
    want = np_lars(init, [[3 * g for g in grads[0]]] * 2, excluded={1})
    for v, w in zip(variables, want, strict=True):
        for local in strategy.experimental_local_results(v.value):
            np.testing.assert_allclose(local.numpy(), w, rtol=1e-5, atol=1e-6)


class _Model(keras.Model):
    """encoder / projection_head / supervised_head, like SimCLRModel."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.Sequential(
            [
                keras.layers.Conv2D(4, 3, use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.Conv2D(4, 1, use_bias=True),
                keras.layers.GlobalAveragePooling2D(),
            ]
        )
        self.projection_head = keras.Sequential(
            [
                keras.layers.Dense(4, use_bias=True),
                keras.layers.Dense(3, use_bias=False),
                keras.layers.BatchNormalization(center=False),
            ]
        )
        self.supervised_head = keras.layers.Dense(2)

    def call(self, x):
        h = self.encoder(x)
        return {"z": self.projection_head(h), "y": self.supervised_head(h)}


def test_lars_exclusions_of_a_small_model():
    model = _Model()
    model(tf.zeros((1, 5, 5, 3)))
    conv0, bn0, conv1, _ = model.encoder.layers
    dense0, _, bn1 = model.projection_head.layers
    head = model.supervised_head
    want = [bn0.gamma, bn0.beta, conv1.bias, dense0.bias, bn1.gamma]
    want += [head.kernel, head.bias]
    groups = simclr_model.weight_groups(model)
    got = groups.lars_exclusions
    assert {id(v) for v in got} == {id(v) for v in want}
    assert len(got) == len(want)
    assert {id(v) for v in groups.batch_norm} == {
        id(bn0.gamma),
        id(bn0.beta),
        id(bn1.gamma),
    }
    assert {id(v) for v in groups.biases} == {
        id(conv1.bias),
        id(dense0.bias),
        id(head.bias),
    }
    assert list(groups.supervised_head) == [head.kernel, head.bias]


def test_lars_exclusions_of_the_resnet18_simclr_model():
    from simclr_tf import config as config_lib
    from simclr_tf.models import factory

    config = config_lib.from_flat(dict(resnet_depth=18, image_size=32))
    model = factory.build_model(config, num_classes=10)
    got = {id(v) for v in model.weight_groups.lars_exclusions}
    # Independent count: every BN has gamma + beta (center=False BN has
    # gamma only), the supervised head has kernel + bias, and the only
    # biases are those of the head's Dense layers.
    want = set()
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            want |= {id(w) for w in layer.trainable_weights}
        if isinstance(layer, keras.layers.Dense) and layer.use_bias:
            want.add(id(layer.bias))
    want |= {id(w) for w in model.supervised_head.trainable_weights}
    assert got == want
    # By hand: 21 BN layers in ResNet-18 (stem, 2 per block x 8 blocks, and
    # the projection shortcut the reference gives the first block of each
    # of the 4 groups) x (gamma, beta); the 3-layer head has 2 BN with gamma
    # + beta and a last BN with gamma only; head kernel + bias.
    assert len(got) == 21 * 2 + 2 * 2 + 1 + 2
    kernels = [
        v
        for v in model.trainable_variables
        if id(v) not in got and len(v.shape) >= 2
    ]
    # Everything else that LARS adapts is a conv or dense kernel.
    assert len(kernels) == len(model.trainable_variables) - len(got)
    head_kernel = model.supervised_head_kernels[0]
    assert id(head_kernel) in got
