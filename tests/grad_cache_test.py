"""Gradient caching gives the plain step's loss and gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.training import grad_cache
from tests.helpers import two_replica_strategy

NUM_CLASSES = 3
WEIGHT_DECAY = 1e-2


class TwoViewNet(keras.Model):
    """(b, 4, 4, 6) two-view images -> view-major outputs of 2b rows."""

    def __init__(self, use_bn, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(5, 3, padding="same")
        self.bn = keras.layers.BatchNormalization() if use_bn else None
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.proj = keras.layers.Dense(4)
        self.supervised_head = keras.layers.Dense(NUM_CLASSES)

    def call(self, images, training=False):
        x = tf.concat(tf.split(images, 2, axis=-1), axis=0)  # (2b, 4, 4, 3)
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x, training=training)
        features = self.pool(tf.nn.relu(x))  # (2b, 5)
        return {
            "features": features,
            "proj": self.proj(features),
            "logits": self.supervised_head(tf.stop_gradient(features)),
        }


def _model(use_bn, seed=0):
    keras.utils.set_random_seed(seed)
    model = TwoViewNet(use_bn)
    model(tf.zeros((1, 4, 4, 6)))
    return model


def _data(batch, seed=1):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(batch, 4, 4, 6)).astype(np.float32)
    labels = np.eye(NUM_CLASSES, dtype=np.float32)[
        rng.integers(0, NUM_CLASSES, batch)
    ]
    return tf.constant(images), tf.constant(labels)


def _loss_fn(model, labels, replica_context=None):
    def loss_fn(outputs):
        con, _, _ = losses.nt_xent_loss(
            outputs["proj"], temperature=0.5, replica_context=replica_context
        )
        sup = losses.supervised_loss(
            tf.concat([labels, labels], 0), outputs["logits"]
        )
        # Uses a variable directly, like the weight-decay term.
        decay = WEIGHT_DECAY * tf.nn.l2_loss(model.proj.kernel)
        total = con + sup + decay
        return total, {"contrast": con, "supervised": sup}

    return loss_fn


def _plain(model, images, labels, training):
    with tf.GradientTape() as tape:
        total, metrics = _loss_fn(model, labels)(
            model(images, training=training)
        )
    return total, metrics, tape.gradient(total, model.trainable_variables)


def _assert_grads_close(got, want, atol=1e-6):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 5, 6, 10])
@pytest.mark.parametrize("use_bn,training", [(False, True), (True, False)])
def test_equals_plain_gradients(chunk_size, use_bn, training):
    model = _model(use_bn)
    images, labels = _data(6)
    want_total, want_metrics, want_grads = _plain(
        model, images, labels, training
    )
    (total, metrics), grads = grad_cache.grad_cache_gradients(
        model,
        images,
        _loss_fn(model, labels),
        chunk_size=chunk_size,
        training=training,
    )
    np.testing.assert_allclose(total.numpy(), want_total.numpy(), rtol=1e-6)
    for name in want_metrics:
        np.testing.assert_allclose(
            metrics[name].numpy(), want_metrics[name].numpy(), rtol=1e-6
        )
    assert all(g is not None for g in grads)
    _assert_grads_close(grads, want_grads)


def test_inside_tf_function_with_loss_scale():
    model = _model(use_bn=False)
    images, labels = _data(7)
    _, _, want_grads = _plain(model, images, labels, True)

    @tf.function
    def step(images):
        return grad_cache.grad_cache_gradients(
            model,
            images,
            _loss_fn(model, labels),
            chunk_size=3,
            loss_scale=0.5,
        )

    (total, _), grads = step(images)
    _assert_grads_close(grads, [0.5 * g for g in want_grads])


def _ghost_bn_reference(model, images, labels, sizes):
    """Plain tape over per-chunk forwards, views reassembled by hand."""
    with tf.GradientTape() as tape:
        v1, v2 = [], []
        offset = 0
        for size in sizes:
            out = model(images[offset : offset + size], training=True)
            v1.append({k: t[:size] for k, t in out.items()})
            v2.append({k: t[size:] for k, t in out.items()})
            offset += size
        full = {
            k: tf.concat([o[k] for o in v1] + [o[k] for o in v2], 0)
            for k in v1[0]
        }
        total, _ = _loss_fn(model, labels)(full)
    return total, tape.gradient(total, model.trainable_variables)


def test_batch_norm_statistics_are_per_chunk():
    images, labels = _data(6)
    reference = _model(use_bn=True)
    want_total, want_grads = _ghost_bn_reference(
        reference, images, labels, [4, 2]
    )
    model = _model(use_bn=True)
    (total, _), grads = grad_cache.grad_cache_gradients(
        model, images, _loss_fn(model, labels), chunk_size=4
    )
    np.testing.assert_allclose(total.numpy(), want_total.numpy(), rtol=1e-6)
    _assert_grads_close(grads, want_grads)
    # Each chunk updated the moving statistics once, as in the reference.
    for got, want in zip(
        model.bn.non_trainable_variables,
        reference.bn.non_trainable_variables,
        strict=True,
    ):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
    # ... which differs from full-batch statistics (documented behaviour).
    _, _, full_batch_grads = _plain(_model(use_bn=True), images, labels, True)
    conv_kernel = model.trainable_variables.index(model.conv.kernel)
    assert not np.allclose(
        grads[conv_kernel].numpy(),
        full_batch_grads[conv_kernel].numpy(),
        rtol=1e-3,
        atol=1e-6,
    )


def test_two_replicas_equal_plain_distributed_step():
    strategy = two_replica_strategy()
    images, labels = _data(10)  # 5 images per replica
    with strategy.scope():
        model = _model(use_bn=False)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: (
            images[5 * ctx.replica_id_in_sync_group :][:5],
            labels[5 * ctx.replica_id_in_sync_group :][:5],
        )
    )

    def replica_step(images, labels, chunk):
        ctx = tf.distribute.get_replica_context()
        loss_fn = _loss_fn(model, labels, replica_context=ctx)
        scale = 1.0 / ctx.num_replicas_in_sync
        if chunk:
            (total, _), grads = grad_cache.grad_cache_gradients(
                model, images, loss_fn, chunk_size=chunk, loss_scale=scale
            )
        else:
            with tf.GradientTape() as tape:
                total, _ = loss_fn(model(images, training=True))
                scaled = total * scale
            grads = tape.gradient(scaled, model.trainable_variables)
        return total, ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)

    @tf.function
    def run(values):
        plain = strategy.run(replica_step, args=(*values, 0))
        cached = strategy.run(replica_step, args=(*values, 2))
        return plain, cached

    (plain_loss, plain_grads), (loss, grads) = run(per_replica)
    local = strategy.experimental_local_results
    for r in range(2):
        np.testing.assert_allclose(
            local(loss)[r].numpy(), local(plain_loss)[r].numpy(), rtol=1e-6
        )
        _assert_grads_close(
            [local(g)[r] for g in grads], [local(g)[r] for g in plain_grads]
        )


def test_rejects_bad_chunk_size_and_dynamic_batch():
    model = _model(use_bn=False)
    images, labels = _data(4)
    with pytest.raises(ValueError, match="chunk_size=0"):
        grad_cache.grad_cache_gradients(
            model, images, _loss_fn(model, labels), chunk_size=0
        )

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 6])])
    def dynamic(images):
        return grad_cache.grad_cache_gradients(
            model, images, _loss_fn(model, labels), chunk_size=2
        )

    with pytest.raises(ValueError, match="static batch size"):
        dynamic(images)


def test_output_keys_select_what_the_loss_reads():
    model = _model(use_bn=False)
    images, labels = _data(5)
    _, _, want_grads = _plain(model, images, labels, True)
    (_, _), grads = grad_cache.grad_cache_gradients(
        model,
        images,
        _loss_fn(model, labels),
        chunk_size=2,
        output_keys=("proj", "logits"),
    )
    _assert_grads_close(grads, want_grads)
    with pytest.raises(ValueError, match="no output"):
        grad_cache.grad_cache_gradients(
            model,
            images,
            _loss_fn(model, labels),
            chunk_size=2,
            output_keys=("projection",),
        )


def test_resnet18_simclr_model_equals_plain():
    from simclr_tf import config as config_lib
    from simclr_tf.models import factory

    config = config_lib.from_flat(
        dict(resnet_depth=18, image_size=8, proj_out_dim=16)
    )
    keras.utils.set_random_seed(0)
    model = factory.build_model(config, num_classes=NUM_CLASSES)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(size=(5, 8, 8, 6)).astype(np.float32))
    labels = tf.constant(np.eye(NUM_CLASSES, dtype=np.float32)[[0, 1, 2, 0, 1]])

    def loss_fn(outputs):
        con, _, _ = losses.nt_xent_loss(
            outputs["proj_head_output"], temperature=0.5
        )
        sup = losses.supervised_loss(
            tf.concat([labels, labels], 0), outputs["logits_sup"]
        )
        return con + sup

    # BN in inference mode, where chunking cannot change the result.
    with tf.GradientTape() as tape:
        want = loss_fn(model(images, training=False))
    want_grads = tape.gradient(want, model.trainable_variables)
    loss, grads = grad_cache.grad_cache_gradients(
        model,
        images,
        loss_fn,
        chunk_size=2,
        training=False,
        output_keys=("proj_head_output", "logits_sup"),
    )
    np.testing.assert_allclose(loss.numpy(), want.numpy(), rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            scale = np.abs(w.numpy()).max() + 1e-12
            np.testing.assert_allclose(
                g.numpy() / scale, w.numpy() / scale, atol=1e-4
            )
