"""Tests of the training step: 2 replicas equal 1 replica on the same
global batch, and the metrics/loss composition."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf import optim
from simclr_tf.models import factory
from simclr_tf.training import step as step_lib
from tests.helpers import (
    build_optimizer,
    distributed_losses,
    two_replica_strategy,
)

GLOBAL_BATCH, SIZE, CLASSES = 8, 16, 5


def _config(**overrides):
    flat = dict(
        resnet_depth=18,
        image_size=SIZE,
        train_batch_size=GLOBAL_BATCH,
        train_steps=1,
        temperature=0.5,
        global_bn=True,
        weight_decay=1e-4,
        optimizer="lars",
        learning_rate=1.0,
    )
    flat.update(overrides)
    return config_lib.from_flat(flat)


def _one_step(strategy, config, weights, images, labels):
    """Builds model + optimizer in `strategy`, loads `weights`, runs one
    distributed step on the global batch; returns the new weights."""
    with strategy.scope():
        model = factory.build_model(config, CLASSES)
        model.set_weights(weights)
        optimizer = build_optimizer(config, model)
    objective = factory.build_objective(config, model)
    replica_step = step_lib.make_replica_step(model, optimizer, objective)
    (loss,) = distributed_losses(strategy, replica_step, images, labels)
    return loss, [w.copy() for w in model.get_weights()]


def test_two_replicas_update_weights_like_one_on_the_global_batch():
    config = _config()
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(GLOBAL_BATCH, SIZE, SIZE, 6)).astype("float32")
    labels = np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, 8)]
    init = factory.build_model(config, CLASSES).get_weights()

    one = tf.distribute.OneDeviceStrategy("/CPU:0")
    loss1, w1 = _one_step(one, config, init, images, labels)
    loss2, w2 = _one_step(two_replica_strategy(), config, init, images, labels)

    assert np.isfinite(loss1)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    changed = 0
    for a, b, before in zip(w1, w2, init, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
        changed += not np.array_equal(a, before)
    # The step really moved the weights (and BN moving statistics).
    assert changed > len(init) // 2


def _metric_names(config):
    model = factory.build_model(config, CLASSES)
    return factory.build_objective(config, model).metric_names


def test_metric_names_follow_the_mode():
    pre = _metric_names(_config())
    assert pre == [
        "contrast_loss",
        "contrast_acc",
        "contrast_entropy",
        "supervised_loss",
        "supervised_acc",
        "weight_decay",
        "total_loss",
    ]
    ft = _metric_names(_config(train_mode="finetune"))
    assert ft == [
        "supervised_loss",
        "supervised_acc",
        "weight_decay",
        "total_loss",
    ]


def test_the_training_core_imports_no_config():
    # The run config stops at the experiment: the step and the loop take
    # a model, an optimizer, an objective and a plan (issue 13).
    import ast
    import pathlib

    import simclr_tf.training.step
    import simclr_tf.training.trainer

    for module in (simclr_tf.training.step, simclr_tf.training.trainer):
        tree = ast.parse(pathlib.Path(module.__file__).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module)
                imported |= {
                    f"{node.module}.{alias.name}" for alias in node.names
                }
        assert "simclr_tf.config" not in imported, module.__name__
        assert "simclr_tf.cli" not in imported, module.__name__


def _np_monitors(proj, features):
    """proj_std and RankMe in NumPy (SimSiam §4.1; Garrido et al. eq. 1)."""
    z = proj / np.linalg.norm(proj, axis=1, keepdims=True)
    s = np.linalg.svd(features.astype(np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    return z.std(0).mean(), np.exp(-(p * np.log(p)).sum())


def _pretrain_loop(config, init, chunk):
    strategy = tf.distribute.OneDeviceStrategy("/CPU:0")
    with strategy.scope():
        model = factory.build_model(config, CLASSES)
        model.set_weights(init)
        optimizer = optim.build_optimizer(
            "lars", 0.5, momentum=0.9, weight_decay=1e-4, lars_exclusions=[]
        )
        optimizer.build(model.trainable_variables)
    objective = factory.build_objective(config, model)
    loop = step_lib.make_train_loop(
        strategy,
        step_lib.make_replica_step(
            model, optimizer, objective, grad_cache_chunk_size=chunk
        ),
        objective.metric_names,
        monitor_names=objective.monitor_names,
    )
    return model, loop


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [0, 4])
def test_loop_reports_the_monitors_of_its_last_step(chunk):
    config = _config()
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(2, GLOBAL_BATCH, SIZE, SIZE, 6))
    labels = np.eye(CLASSES)[rng.integers(0, CLASSES, (2, GLOBAL_BATCH))]
    data = tf.data.Dataset.from_tensor_slices(
        (images.astype("float32"), labels.astype("float32"))
    )
    init = factory.build_model(config, CLASSES).get_weights()

    _, loop_a = _pretrain_loop(config, init, chunk)
    two_steps = loop_a(iter(data), tf.constant(2))
    model_b, loop_b = _pretrain_loop(config, init, chunk)
    it = iter(data)
    loop_b(it, tf.constant(1))
    # Step 2's outputs (training mode: batch statistics, per chunk).
    size = chunk or GLOBAL_BATCH
    parts = [
        model_b(images[1, i : i + size].astype("float32"), training=True)
        for i in range(0, GLOBAL_BATCH, size)
    ]
    proj = np.concatenate([p["proj_head_output"].numpy() for p in parts])
    features = np.concatenate([p["proj_head_input"].numpy() for p in parts])
    want_std, want_rank = _np_monitors(proj, features)
    step_2 = loop_b(it, tf.constant(1))
    for got in (step_2, two_steps):
        np.testing.assert_allclose(got["proj_std"], want_std, rtol=1e-4)
        np.testing.assert_allclose(got["rankme"], want_rank, rtol=1e-3)
    # In range: std <= 1/sqrt(d) (Jensen), 1 <= RankMe <= min(rows, dim).
    assert 0.0 < float(two_steps["proj_std"]) <= 1 / np.sqrt(proj.shape[1])
    assert 1.0 <= float(two_steps["rankme"]) <= min(features.shape)
