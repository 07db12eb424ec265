"""Tests of the distillation mode: the objective against NumPy, a frozen
teacher, 2 replicas = 1 replica, teacher loading, smoke runs, bad input."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf import config as config_lib
from simclr_tf import experiment, objective
from simclr_tf import teacher as teacher_lib
from simclr_tf.data import sources
from simclr_tf.models import factory
from simclr_tf.training import checkpoints
from simclr_tf.training import step as step_lib
from tests.helpers import (
    SMOKE,
    build_optimizer,
    distributed_losses,
    run_on_mock_data,
    smoke_config,
    two_replica_strategy,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
MOCK_RUN = ROOT / "scripts" / "run_on_mock_data.py"
GLOBAL_BATCH, SIZE, CLASSES = 8, 16, 5


# --------------------------------------------------------------------------
# The objective against NumPy.


def _np_log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _np_objective(teacher, student, labels, t, alpha, w, wd):
    """alpha T^2 CE(softmax(teacher/T), student/T) + (1-alpha) CE(y, s)
    + wd * ||w||^2 / 2, in float64."""
    soft = np.exp(_np_log_softmax(teacher / t))
    kd = t**2 * np.mean(-(soft * _np_log_softmax(student / t)).sum(axis=1))
    ce = np.mean(-(labels * _np_log_softmax(student)).sum(axis=1))
    decay = wd * 0.5 * np.sum(w**2)
    return alpha * kd + (1 - alpha) * ce + decay, kd, ce, decay


@pytest.mark.parametrize("t", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_objective_matches_numpy(t, alpha):
    rng = np.random.default_rng(int(t * 10 + alpha * 100))
    teacher = rng.normal(size=(6, CLASSES)) * 3
    student = rng.normal(size=(6, CLASSES)) * 3
    labels = np.eye(CLASSES)[rng.integers(0, CLASSES, 6)]
    w = rng.normal(size=(4, 3))
    variable = tf.Variable(w.astype(np.float32))
    obj = objective.DistillationObjective(
        teacher=None,
        temperature=t,
        alpha=alpha,
        labelled=True,
        weight_decay=1e-2,
        decayed_variables=[variable],
    )
    outputs = {
        "logits_sup": tf.constant(student, tf.float32),
        "teacher_logits": tf.constant(teacher, tf.float32),
    }
    total, metrics = obj(outputs, tf.constant(labels, tf.float32), None)
    want, kd, ce, decay = _np_objective(
        teacher, student, labels, t, alpha, w.astype(np.float32), 1e-2
    )
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["distill_loss"]), kd, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["supervised_loss"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["weight_decay"]), decay, 1e-5)
    agree = np.mean(teacher.argmax(1) == student.argmax(1))
    assert float(metrics["teacher_agreement"]) == pytest.approx(agree)
    acc = np.mean(labels.argmax(1) == student.argmax(1))
    assert float(metrics["supervised_acc"]) == pytest.approx(acc)
    assert set(metrics) == set(obj.metric_names)


def test_objective_without_labels_reads_no_labels():
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=(4, CLASSES))
    student = rng.normal(size=(4, CLASSES))
    obj = objective.DistillationObjective(None, 2.0, 1.0, False, 0.0, [])
    assert obj.metric_names == [
        "distill_loss",
        "teacher_agreement",
        "weight_decay",
        "total_loss",
    ]
    outputs = {
        "logits_sup": tf.constant(student, tf.float32),
        "teacher_logits": tf.constant(teacher, tf.float32),
    }
    # Unlabelled data: labels of shape (n, 0).
    total, _ = obj(outputs, tf.zeros((4, 0)), None)
    want = _np_objective(teacher, student, np.zeros_like(student), 2, 1, 0, 0)
    np.testing.assert_allclose(float(total), want[0], rtol=1e-5)
    with pytest.raises(ValueError, match="distill_alpha=0.5"):
        objective.DistillationObjective(None, 1.0, 0.5, False, 0.0, [])


# --------------------------------------------------------------------------
# The step: a frozen teacher; 2 replicas equal 1.


def _config(**overrides):
    flat = dict(
        train_mode="distill",
        teacher="/unused",
        resnet_depth=18,
        image_size=SIZE,
        train_batch_size=GLOBAL_BATCH,
        train_steps=1,
        global_bn=True,
        weight_decay=1e-4,
        optimizer="lars",
        learning_rate=1.0,
        distill_temperature=2.0,
        proj_head_mode="none",
    )
    flat.update(overrides)
    return config_lib.from_flat(flat)


def _teacher_config():
    return config_lib.from_flat(
        dict(
            train_mode="finetune",
            resnet_depth=18,
            width_multiplier=1,
            image_size=SIZE,
            ft_proj_selector=1,
        )
    )


def _teacher(teacher_weights):
    """A Teacher around a finetune model with `teacher_weights`, built in
    the current scope."""
    model = factory.build_model(_teacher_config(), CLASSES, "float32")
    model.set_weights(teacher_weights)
    model.trainable = False
    spec = teacher_lib.TeacherSpec(
        "test", "test", _teacher_config(), CLASSES, None, ""
    )
    return teacher_lib.Teacher(model, spec)


def _one_step(
    strategy, config, weights, teacher_weights, images, steps=1, chunk=0
):
    with strategy.scope():
        model = factory.build_model(config, CLASSES)
        model.set_weights(weights)
        teacher = _teacher(teacher_weights)
        optimizer = build_optimizer(config, model)
    obj = factory.build_objective(config, model, teacher, labelled=False)
    replica_step = step_lib.make_replica_step(
        model, optimizer, obj, grad_cache_chunk_size=chunk
    )
    no_labels = tf.zeros((images.shape[0], 0))
    losses = distributed_losses(
        strategy, replica_step, images, no_labels, steps
    )
    return losses, model, teacher, optimizer


def _inputs():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(GLOBAL_BATCH, SIZE, SIZE, 3)).astype("float32")
    config = _config()
    init = factory.build_model(config, CLASSES).get_weights()
    teacher = factory.build_model(_teacher_config(), CLASSES)
    # Non-zero BN statistics and a head with a spread of logits.
    tw = [
        w + rng.normal(scale=0.05, size=w.shape).astype(w.dtype)
        for w in teacher.get_weights()
    ]
    return config, images, init, tw


def test_two_replicas_distill_like_one_on_the_global_batch():
    config, images, init, tw = _inputs()
    one = tf.distribute.OneDeviceStrategy("/CPU:0")
    (loss1,), m1, _, _ = _one_step(one, config, init, tw, images)
    (loss2,), m2, _, _ = _one_step(
        two_replica_strategy(), config, init, tw, images
    )
    assert np.isfinite(loss1) and loss1 > 0
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    changed = 0
    for a, b, before in zip(
        m1.get_weights(), m2.get_weights(), init, strict=True
    ):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
        changed += not np.array_equal(a, before)
    assert changed > len(init) // 2


def test_gradient_caching_passes_the_teacher_logits_through():
    # One chunk of the whole batch: the same batch-norm statistics as the
    # plain step, so the two must agree (the teacher logits reach the
    # cached loss whole).
    config, images, init, tw = _inputs()
    one = tf.distribute.OneDeviceStrategy("/CPU:0")
    (plain,), m1, _, _ = _one_step(one, config, init, tw, images)
    (cached,), m2, _, _ = _one_step(
        one, config, init, tw, images, chunk=GLOBAL_BATCH
    )
    np.testing.assert_allclose(cached, plain, rtol=1e-6)
    for a, b in zip(m1.get_weights(), m2.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_teacher_is_frozen_and_not_in_the_student_checkpoint(tmp_path):
    config, images, init, tw = _inputs()
    one = tf.distribute.OneDeviceStrategy("/CPU:0")
    losses, model, teacher, optimizer = _one_step(
        one, config, init, tw, images, steps=3
    )
    assert losses[-1] != losses[0]  # The student learns.
    # Every teacher weight, BN moving statistics included, is untouched.
    for got, want in zip(teacher.model.get_weights(), tw, strict=True):
        assert np.array_equal(got, want)
    assert not teacher.model.trainable_variables
    path = checkpoints.Checkpointer(model, optimizer, str(tmp_path), 1).save(3)
    # The same student and optimizer without any teacher save the same
    # variables: the teacher adds none to the student's checkpoint.
    with one.scope():
        alone = factory.build_model(config, CLASSES)
        alone_opt = build_optimizer(config, alone)
    alone_path = checkpoints.Checkpointer(
        alone, alone_opt, str(tmp_path / "alone"), 1
    ).save(3)
    saved = dict(tf.train.list_variables(path))
    assert saved == dict(tf.train.list_variables(alone_path))


# --------------------------------------------------------------------------
# End to end: a teacher run, distillation from its run dir and export.


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A 2-step fine-tuning run on mock CIFAR-10 (10 classes)."""
    model_dir = tmp_path_factory.mktemp("teacher")
    run_on_mock_data(
        smoke_config(
            model_dir, train_mode="finetune", knn_k=0, mixed_precision="none"
        )
    )
    return model_dir


def _distill_config(model_dir, teacher, **overrides):
    values = dict(
        train_mode="distill",
        teacher=str(teacher),
        proj_head_mode="none",
        knn_k=0,
        resnet_depth=18,
        width_multiplier=1,
        resnet_base_width=32,  # A smaller student than its teacher.
    )
    values.update(overrides)
    return smoke_config(model_dir, **values)


@pytest.mark.slow
def test_distill_run_on_mock_data(teacher_run, tmp_path):
    results = run_on_mock_data(_distill_config(tmp_path, teacher_run))
    for key in (
        "eval/label_top_1_accuracy",
        "eval/label_top_5_accuracy",
        "eval/teacher_top_1_accuracy",
        "eval/teacher_top_5_accuracy",
    ):
        assert 0.0 <= results[key] <= 1.0, key
    with open(tmp_path / "result.json") as f:
        assert json.load(f)["eval/teacher_top_1_accuracy"] == pytest.approx(
            results["eval/teacher_top_1_accuracy"]
        )
    with open(teacher_run / "result.json") as f:
        teacher_result = json.load(f)
    # The teacher's numbers are its own run's eval on the same split.
    assert results["eval/teacher_top_1_accuracy"] == pytest.approx(
        teacher_result["eval/label_top_1_accuracy"]
    )
    # The export is the student: its architecture, the teacher's classes.
    meta = json.loads(
        (
            tmp_path / "saved_model" / "2" / "assets" / "simclr_metadata.json"
        ).read_text()
    )
    assert meta["resnet_base_width"] == 32 and meta["num_classes"] == 10
    assert meta["train_mode"] == "distill"


@pytest.mark.slow
def test_teacher_from_run_dir_checkpoint_and_export_agree(teacher_run):
    images = tf.random.stateless_uniform((4, 32, 32, 3), seed=[1, 2])
    strategy = tf.distribute.OneDeviceStrategy("/CPU:0")
    ckpt = tf.train.latest_checkpoint(str(teacher_run))
    logits = {
        path: teacher_lib.load(str(path), strategy)(images).numpy()
        for path in (
            teacher_run,
            ckpt,
            teacher_run / "saved_model" / "2",
            teacher_run / "saved_model",
        )
    }
    kinds = {teacher_lib.inspect(str(p)).kind for p in logits}
    assert kinds == {
        teacher_lib.RUN,
        teacher_lib.CHECKPOINT,
        teacher_lib.EXPORT,
    }
    # The exported SavedModel's own function is an independent reference.
    exported = tf.saved_model.load(str(teacher_run / "saved_model" / "2"))
    want = exported(images, training=False)["logits_sup"].numpy()
    assert np.abs(want).max() > 0
    for path, got in logits.items():
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-6, err_msg=str(path)
        )


def _write_images(directory, count, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(36, 36, 3), dtype=np.uint8)
        tf.io.write_file(
            os.path.join(directory, f"{i}.png"), tf.io.encode_png(pixels)
        )


@pytest.mark.slow
def test_distill_run_on_an_unlabelled_folder(teacher_run, tmp_path):
    folder = tmp_path / "images"
    _write_images(folder, 24)
    model_dir = tmp_path / "student"
    config = _distill_config(
        model_dir,
        teacher_run / "saved_model",
        dataset=f"folder:{folder}",
        train_split="train",
        mode="train",
    )
    experiment.run(config)  # prepare() checks the teacher first.
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-2")
    with open(model_dir / "run_info.json") as f:
        assert json.load(f)["num_classes"] == 10  # The teacher's.


# --------------------------------------------------------------------------
# Bad input: one clear line each, before anything is written.


@pytest.mark.slow
def test_bad_teachers_fail_before_writing(teacher_run, tmp_path):
    def check(teacher, **overrides):
        config = _distill_config(tmp_path / "out", teacher, **overrides)
        with tfds.testing.mock_data(num_examples=48):
            info = sources.open_source(config.data).info
            experiment.check_teacher(config, info)

    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        check(tmp_path / "missing")
    # A pretraining run without a linear head.
    pre_dir = tmp_path / "pre"
    run_on_mock_data(
        smoke_config(
            pre_dir,
            lineareval_while_pretraining=False,
            train_steps=1,
            knn_k=0,
            mode="train",
        )
    )
    with pytest.raises(config_lib.ConfigError, match="without a supervised"):
        check(pre_dir)
    # Classes that differ from a labelled dataset's (2 vs 10).
    folder = tmp_path / "two"
    _write_images(folder / "a", 4)
    _write_images(folder / "b", 4, seed=1)
    with pytest.raises(config_lib.ConfigError, match="10 classes"):
        check(teacher_run, dataset=f"folder:{folder}")
    # The labelled term on unlabelled data.
    flat = tmp_path / "flat"
    _write_images(flat, 4)
    with pytest.raises(config_lib.ConfigError, match="distill_alpha=0.5"):
        check(teacher_run, dataset=f"folder:{flat}", distill_alpha=0.5)
    # Unreadable: a corrupt config.json, a truncated checkpoint.
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(teacher_run):
        src = teacher_run / name
        if src.is_file():
            (broken / name).write_bytes(src.read_bytes())
    (broken / "config.json").write_text("{not json")
    with pytest.raises(config_lib.ConfigError, match="cannot be read"):
        check(broken)
    (broken / "config.json").write_bytes(
        (teacher_run / "config.json").read_bytes()
    )
    data = next(p for p in broken.iterdir() if ".data-" in p.name)
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(config_lib.ConfigError, match="truncated or corrupt"):
        check(broken)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_run_py_exits_2_on_a_bad_teacher_and_writes_nothing(tmp_path):
    model_dir = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(MOCK_RUN),
            f"--flagfile={SMOKE}",
            f"--model_dir={model_dir}",
            "--train_mode=distill",
            f"--teacher={tmp_path / 'missing'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "run.py: error: Received: teacher=" in result.stderr
    assert "does not exist" in result.stderr
    assert not model_dir.exists()


# --------------------------------------------------------------------------
# Reference teachers (fixtures in the reference layout, tests/interop_test).


def test_reference_saved_model_teacher_reads_the_tensor_its_function_does(
    tmp_path,
):
    from tests import reference_layout as rl

    # Narrow ResNet-18: projection-head tensors 64, 64, 64 wide, so the
    # shapes do not say which one the supervised head reads.
    arch = rl.Arch(18, 1, False, 0.0, True, 10, True, base=8)
    variables = rl.layout(arch)
    values = rl.random_values(variables, seed=3)
    directory = tmp_path / "saved_model" / "700"
    rl.write_saved_model(arch, variables, values, str(directory))
    spec = teacher_lib.check(str(tmp_path / "saved_model"), 10)
    assert len(spec.selectors) > 1
    teacher = teacher_lib.load(str(tmp_path), tf.distribute.get_strategy())
    images = tf.random.stateless_uniform((3, 16, 16, 3), seed=(4, 5))
    loaded = tf.saved_model.load(str(directory))
    want = loaded(images, trainable=False)["logits_sup"].numpy()
    got = teacher(images).numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale


def test_reference_checkpoint_teacher_matches_the_reference_forward(
    tmp_path,
):
    from tests import reference_forward
    from tests import reference_layout as rl

    # One projection layer (64 -> 16): only the encoder output fits the
    # 64-wide supervised head, as the reference forward pass reads it.
    arch = rl.Arch(18, 1, False, 0.0, True, 7, True, base=8)
    arch = dataclasses.replace(arch, proj_layers=1, proj_out=16)
    variables = rl.layout(arch)
    values = rl.random_values(variables, seed=4)
    prefix = rl.write_checkpoint(variables, values, str(tmp_path / "r"), 9)
    teacher = teacher_lib.load(prefix, tf.distribute.get_strategy())
    assert teacher.num_classes == 7
    images = tf.random.stateless_uniform((3, 16, 16, 3), seed=(6, 7))
    want = reference_forward.forward(arch, values, images)["logits_sup"]
    got = teacher(images).numpy()
    scale = np.abs(want.numpy()).max()
    assert np.abs(got - want.numpy()).max() <= 1e-5 * scale


@pytest.mark.slow
def test_run_py_distills_on_mock_data(teacher_run, tmp_path):
    model_dir = tmp_path / "student"
    result = subprocess.run(
        [
            sys.executable,
            str(MOCK_RUN),
            f"--flagfile={SMOKE}",
            f"--model_dir={model_dir}",
            "--train_mode=distill",
            f"--teacher={teacher_run}",
            "--distill_temperature=2",
            "--distill_alpha=0.5",
            "--proj_head_mode=none",
            "--knn_k=0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher_agreement" in result.stderr
    results = json.loads((model_dir / "result.json").read_text())
    assert 0 <= results["eval/teacher_top_1_accuracy"] <= 1
    assert 0 <= results["eval/label_top_1_accuracy"] <= 1
    flags = (model_dir / "flags.cfg").read_text()
    assert f"--teacher={teacher_run}" in flags
    assert "--distill_alpha=0.5" in flags
    assert (model_dir / "saved_model" / "2" / "saved_model.pb").exists()
