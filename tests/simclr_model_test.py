"""Tests of SimCLRModel: views, endpoints, selector, gradients, saving."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models import blocks, heads, resnet, simclr_model
from tests import helpers

SIZE = 16
ENCODER_KEYS = set(resnet.ENDPOINTS)


def make_model(
    num_classes=5,
    mode="nonlinear",
    selector=0,
    num_views=2,
    stop_gradient=True,
    global_bn=False,
    fine_tune_after_block=-1,
):
    bn = dict(batch_norm_decay=0.9, global_bn=global_bn)
    model = simclr_model.SimCLRModel(
        resnet.ResNet(
            18,
            1,
            cifar_stem=True,
            fine_tune_after_block=fine_tune_after_block,
            **bn,
        ),
        heads.ProjectionHead(mode, 16, 3, **bn),
        heads.SupervisedHead(num_classes) if num_classes else None,
        ft_proj_selector=selector,
        num_views=num_views,
        stop_gradient_supervised=stop_gradient,
    )
    model.build((None, SIZE, SIZE, 3 * num_views))
    return model


def images(batch=3, views=2, seed=0):
    shape = (batch, SIZE, SIZE, 3 * views)
    return tf.random.stateless_uniform(shape, seed=(seed, 1))


def test_outputs_keys_shapes_dtypes():
    model = make_model()
    out = model(images(), training=True)
    assert set(out) == ENCODER_KEYS | {
        "proj_head_input",
        "proj_head_output",
        "logits_sup",
    }
    assert all(v.dtype == tf.float32 for v in out.values())
    assert tuple(out["proj_head_output"].shape) == (6, 16)
    assert tuple(out["proj_head_input"].shape) == (6, 512)
    assert tuple(out["logits_sup"].shape) == (6, 5)
    assert tuple(out["block_group4"].shape) == (6, 2, 2, 512)
    np.testing.assert_array_equal(out["proj_head_input"], out["final_avg_pool"])
    no_head = make_model(num_classes=None)
    assert no_head.supervised_head is None
    assert no_head.supervised_head_kernels == []
    assert "logits_sup" not in no_head(images(), training=False)


def test_views_split_on_channels_view_major():
    model = make_model()
    x = images(batch=3, views=2)
    out = model(x, training=False)
    # Inference mode is per-example: each view alone gives the same rows.
    for v in range(2):
        alone = model(x[..., 3 * v : 3 * v + 3], training=False)
        for key in ("proj_head_output", "logits_sup", "final_avg_pool"):
            np.testing.assert_allclose(
                out[key][3 * v : 3 * v + 3], alone[key], rtol=1e-5, atol=1e-5
            )


def test_views_form_one_training_batch():
    # Training-mode BN sees both views together: (2B) rows, one statistic.
    model = make_model(num_classes=None)
    x = images(batch=2, views=2)
    out = model(x, training=True)
    stacked = tf.concat([x[..., :3], x[..., 3:]], axis=0)
    one_view = make_model(num_classes=None, num_views=1)
    one_view.set_weights(model.get_weights())
    ref = one_view(stacked, training=True)
    np.testing.assert_allclose(
        out["proj_head_output"], ref["proj_head_output"], atol=1e-5
    )


@pytest.mark.parametrize("selector", [0, 1, 2, 3, -1, -4])
def test_ft_proj_selector(selector):
    model = make_model(selector=selector)
    out = model(images(), training=False)
    hiddens = model.projection_head(out["final_avg_pool"], training=False)
    selected = hiddens[selector].numpy().astype("float64")
    head = model.supervised_head
    ref = selected @ head.dense.kernel.numpy() + head.dense.bias.numpy()
    np.testing.assert_allclose(out["logits_sup"], ref, rtol=1e-4, atol=1e-6)
    assert head.dense.kernel.shape[0] == (16 if selector in (3, -1) else 512)
    if selector in (0, -4):
        # Exactly the encoder output: the same op on the same tensor.
        np.testing.assert_array_equal(
            out["logits_sup"], head(out["final_avg_pool"])
        )


def test_none_head_output_is_encoder_output():
    model = make_model(mode="none", selector=-1)
    out = model(images(), training=True)
    np.testing.assert_array_equal(
        out["proj_head_output"], out["final_avg_pool"]
    )
    assert tuple(out["proj_head_output"].shape) == (6, 512)


def test_linear_head_output_is_a_tensor():
    out = make_model(mode="linear", selector=1)(images(), training=True)
    assert isinstance(out["proj_head_output"], tf.Tensor)
    assert tuple(out["proj_head_output"].shape) == (6, 16)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_supervised_stop_gradient(stop_gradient):
    model = make_model(selector=1, stop_gradient=stop_gradient)
    body = (
        model.encoder.trainable_variables
        + model.projection_head.linear_layers[0].trainable_variables
    )
    sup = model.supervised_head.trainable_variables
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(images(), training=True)["logits_sup"])
    grads = tape.gradient(loss, body + sup)
    assert all(g is not None for g in grads[len(body) :])
    if stop_gradient:
        assert all(g is None for g in grads[: len(body)])
    else:
        assert all(g is not None for g in grads[: len(body)])


def test_bad_inputs_raise():
    model = make_model()
    with pytest.raises(ValueError, match="3 \\* views"):
        model(tf.zeros((1, SIZE, SIZE, 4)))
    with pytest.raises(ValueError, match="ft_proj_selector=4"):
        make_model(selector=4)


def test_get_config_round_trip():
    model = make_model(selector=2, fine_tune_after_block=1)
    config = model.get_config()
    clone = simclr_model.SimCLRModel.from_config(config)
    assert clone.get_config() == config
    clone.build((None, SIZE, SIZE, 6))
    clone.set_weights(model.get_weights())
    x = images()
    a, b = model(x, training=False), clone(x, training=False)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    trainable = [p.trainable for p in clone.encoder.parts]
    assert trainable == [False, False, True, True, True]


def test_keras_save_load(tmp_path):
    model = make_model(selector=1, fine_tune_after_block=2)
    # Non-trivial BN statistics and weights.
    model(images(seed=3), training=True)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, simclr_model.SimCLRModel)
    assert isinstance(loaded.encoder, resnet.ResNet)
    x = images(seed=4)
    a, b = model(x, training=False), loaded(x, training=False)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert len(loaded.trainable_variables) == len(model.trainable_variables)


def test_checkpoint_restores_parts(tmp_path):
    model = make_model()
    model(images(seed=5), training=True)
    parts = dict(
        encoder=model.encoder,
        projection_head=model.projection_head,
        supervised_head=model.supervised_head,
    )
    path = tf.train.Checkpoint(**parts).save(str(tmp_path / "ckpt"))
    other = make_model()
    tf.train.Checkpoint(
        encoder=other.encoder,
        projection_head=other.projection_head,
        supervised_head=other.supervised_head,
    ).restore(path).assert_consumed()
    for a, b in zip(model.weights, other.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_mixed_bfloat16_policy():
    reference = make_model()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = make_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    conv = model.encoder.stem.convs[0]
    assert conv.compute_dtype == "bfloat16"
    assert conv.kernel.dtype == "float32"
    assert model.supervised_head.compute_dtype == "bfloat16"
    model.set_weights(reference.get_weights())
    x = images()
    # Inference mode: training-mode BN over 6 rows amplifies rounding.
    out = model(x, training=False)
    ref = reference(x, training=False)
    assert all(v.dtype == tf.float32 for v in out.values())
    for key in ("final_avg_pool", "proj_head_output", "logits_sup"):
        err = np.linalg.norm(out[key] - ref[key]) / np.linalg.norm(ref[key])
        assert err < 0.02, (key, err)


@functools.cache
def two_replicas() -> tf.distribute.MirroredStrategy:
    # One strategy for the module: two MirroredStrategy objects in a process
    # reuse collective instance keys, and their all-reduces can collide.
    return helpers.two_replica_strategy()


def run_two_replicas(strategy, layer, x):
    """`layer(x, training=True)` with x split over 2 replicas; concat."""
    n = x.shape[0] // 2

    def shard(ctx):
        i = ctx.replica_id_in_sync_group
        return x[n * i : n * (i + 1)]

    dist = strategy.experimental_distribute_values_from_function(shard)

    @tf.function
    def step(batch):
        return strategy.run(lambda b: layer(b, training=True), args=(batch,))

    out = step(dist)
    return tf.nest.map_structure(
        lambda t: tf.concat(strategy.experimental_local_results(t), 0), out
    )


def test_synchronized_bn_block_two_replicas():
    # Fast check on one block: 2 replicas x 2 images == 1 replica x 4.
    x = tf.random.stateless_normal((4, 6, 6, 3), seed=(7, 1))
    kwargs = dict(strides=2, use_projection=True)
    reference = blocks.BasicBlock(4, global_bn=False, **kwargs)
    reference.build(x.shape)
    strategy = two_replicas()
    with strategy.scope():
        block = blocks.BasicBlock(4, global_bn=True, **kwargs)
        block.build(x.shape)
        unsynced = blocks.BasicBlock(4, global_bn=False, **kwargs)
        unsynced.build(x.shape)
    rng = np.random.default_rng(8)
    weights = [rng.normal(size=w.shape) for w in reference.get_weights()]
    for layer in (reference, block, unsynced):
        layer.set_weights(weights)
    got = run_two_replicas(strategy, block, x)
    np.testing.assert_allclose(
        got, reference(x, training=True), rtol=1e-4, atol=1e-4
    )
    # Per-replica statistics differ: the comparison above can fail.
    local = run_two_replicas(strategy, unsynced, x)
    assert not np.allclose(local, got, atol=1e-3)


@pytest.mark.slow
def test_synchronized_bn_two_replicas_equal_one_replica_on_whole_batch():
    x = images(batch=4, views=2, seed=6)  # global batch 4, 2 per replica
    reference = make_model(num_views=1, global_bn=False)
    strategy = two_replicas()
    with strategy.scope():
        model = make_model(num_views=1, global_bn=True)
    model.set_weights(reference.get_weights())
    # One view per replica-batch: no view reordering between the two runs.
    x = x[..., :3]
    ref = reference(x, training=True)

    out = run_two_replicas(strategy, model, x)
    for key in ("block_group1", "final_avg_pool", "proj_head_output"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-4, atol=1e-4)
    # The moving statistics moved by the global batch's moments, on both
    # replicas.
    for mirrored, single in zip(
        model.non_trainable_weights,
        reference.non_trainable_weights,
        strict=True,
    ):
        for value in strategy.experimental_local_results(mirrored.value):
            np.testing.assert_allclose(value, single.numpy(), atol=1e-5)


def test_weight_groups_are_collected_once_and_stay_out_of_checkpoints(
    tmp_path,
):
    model = make_model()
    groups = model.weight_groups
    assert model.weight_groups is groups
    head = model.supervised_head
    assert list(groups.supervised_head) == [head.dense.kernel, head.dense.bias]
    # The cached groups add no object to the checkpoint: same variables as
    # a model that never collected them.
    fresh = make_model()
    a = tf.train.Checkpoint(model=model).save(str(tmp_path / "a"))
    b = tf.train.Checkpoint(model=fresh).save(str(tmp_path / "b"))
    assert tf.train.list_variables(a) == tf.train.list_variables(b)
    unbuilt = simclr_model.SimCLRModel(
        resnet.ResNet(18, 1, cifar_stem=True),
        heads.ProjectionHead("linear", 16, 1),
    )
    with pytest.raises(ValueError, match="unbuilt SimCLRModel"):
        _ = unbuilt.weight_groups
