"""End-to-end tests of the engine: run.py smoke, resume, linear-eval
invariant, NaN stop, preemption, checkpoint errors, multi-worker."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf import cli, experiment, health
from simclr_tf import config as config_lib
from simclr_tf import objective as objective_lib
from simclr_tf.data import sources
from simclr_tf.training import checkpoints, trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE = ROOT / "flags" / "smoke.cfg"
MOCK_RUN = ROOT / "scripts" / "run_on_mock_data.py"


def _smoke_config(model_dir, **overrides):
    """The smoke recipe's config with overrides, without global flags."""
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["run.py", f"--flagfile={SMOKE}", f"--model_dir={model_dir}"])
    flat = config_lib.to_flat(cli.config_from_flags())
    cli.FLAGS.unparse_flags()
    flat.update(overrides)
    return config_lib.from_flat(flat)


def _run(config):
    with tfds.testing.mock_data(num_examples=48):
        return experiment.run(config)


def _mock_run_cmd(*args):
    return [sys.executable, str(MOCK_RUN), f"--flagfile={SMOKE}", *args]


def _encoder_state(model):
    return [v.numpy().copy() for v in model.encoder.weights]


@pytest.mark.slow
def test_smoke_run_py_leaves_every_output(tmp_path):
    result = subprocess.run(
        _mock_run_cmd(f"--model_dir={tmp_path}"),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/2" in result.stderr
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")
    assert list(tmp_path.glob("events.out.tfevents.*"))
    record = json.loads((tmp_path / "result.json").read_text())
    for key in (
        "global_step",
        "eval/label_top_1_accuracy",
        "eval/label_top_5_accuracy",
        "eval/regularization_loss",
        "eval/knn_top_1_accuracy",
    ):
        assert key in record, key
    assert record["global_step"] == 2
    assert "flags" not in record  # Numbers only; flags in flags.json.
    flags = json.loads((tmp_path / "flags.json").read_text())
    assert flags["train_steps"] == 2
    assert (tmp_path / "result_2.json").exists()
    assert "--train_steps=2" in (tmp_path / "flags.cfg").read_text()
    assert (tmp_path / "saved_model" / "2" / "saved_model.pb").exists()
    facts = json.loads((tmp_path / "run_info.json").read_text())
    # mock_data: cifar10's 10 classes, 48 examples per split; 2 steps.
    assert facts["num_classes"] == 10 and len(facts["class_names"]) == 10
    assert facts["num_train_examples"] == facts["num_eval_examples"] == 48
    assert facts["total_steps"] == 2
    assert facts["dtype_policy"] in ("float32", "mixed_bfloat16")


class _Killed(Exception):
    pass


def test_resume_continues_to_the_same_total(tmp_path, monkeypatch):
    def config(name):
        return _smoke_config(
            tmp_path / name,
            train_steps=4,
            checkpoint_steps=2,
            seed=3,
            mode="train",
            keep_hub_module_max=-1,
        )

    _run(config("straight"))
    save = checkpoints.Checkpointer.save

    def save_then_die(self, step):
        path = save(self, step)
        if step == 2:
            raise _Killed
        return path

    monkeypatch.setattr(checkpoints.Checkpointer, "save", save_then_die)
    with pytest.raises(_Killed):
        _run(config("resumed"))
    monkeypatch.setattr(checkpoints.Checkpointer, "save", save)
    _run(config("resumed"))

    a = tf.train.load_checkpoint(str(tmp_path / "straight"))
    b = tf.train.load_checkpoint(str(tmp_path / "resumed"))
    assert tf.train.latest_checkpoint(str(tmp_path / "resumed")).endswith(
        "ckpt-4"
    )
    names = [n for n, _ in tf.train.list_variables(str(tmp_path / "straight"))]
    encoder = [n for n in names if "encoder" in n and "VARIABLE_VALUE" in n]
    assert encoder
    for name in encoder:
        # Same seed, same data stream (the resumed pipeline skips the
        # consumed batches): equal up to float reduction order.
        np.testing.assert_allclose(
            a.get_tensor(name),
            b.get_tensor(name),
            rtol=1e-5,
            atol=1e-6,
            err_msg=name,
        )


def test_linear_eval_leaves_encoder_bit_identical(tmp_path):
    pre = _smoke_config(
        tmp_path / "pre", mode="train", train_steps=1, keep_hub_module_max=-1
    )
    _run(pre)
    lin = _smoke_config(
        tmp_path / "lin",
        mode="train",
        train_mode="finetune",
        fine_tune_after_block=4,
        zero_init_logits_layer=True,
        checkpoint=str(tmp_path / "pre"),
        train_steps=3,
        global_bn=False,
        optimizer="momentum",
        learning_rate=0.1,
        weight_decay=0.0,
        keep_hub_module_max=-1,
    )
    with tfds.testing.mock_data(num_examples=48):
        strategy = tf.distribute.OneDeviceStrategy("/CPU:0")
        source = sources.open_source(lin.data)
        model, optimizer = experiment.build_model_and_optimizer(
            lin, strategy, source.info
        )
        checkpoints.restore_initial_weights(model, lin)
        before = _encoder_state(model)
        head_before = model.supervised_head.weights[0].numpy().copy()
        assert experiment.train(lin, strategy, model, optimizer, source) == 3
    after = _encoder_state(model)
    assert len(before) == len(after) > 0
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(
        head_before, model.supervised_head.weights[0].numpy()
    )


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    built = {}
    original_build = experiment.build_model_and_optimizer
    original_losses = objective_lib.ContrastiveObjective.__call__

    def capture(*args, **kwargs):
        built["model"], built["optimizer"] = original_build(*args, **kwargs)
        return built["model"], built["optimizer"]

    def nan_from_step_3(self, outputs, labels, ctx):
        total, metrics = original_losses(self, outputs, labels, ctx)
        # Steps 1 and 2 are finite and checkpointed; step 3 is NaN.
        bad = built["optimizer"].iterations >= 2
        total = tf.where(bad, tf.constant(np.nan, tf.float32), total)
        return total, dict(metrics, total_loss=total)

    monkeypatch.setattr(experiment, "build_model_and_optimizer", capture)
    monkeypatch.setattr(
        objective_lib.ContrastiveObjective, "__call__", nan_from_step_3
    )
    config = _smoke_config(
        tmp_path,
        mode="train",
        train_steps=5,
        checkpoint_steps=1,
        keep_hub_module_max=-1,
    )
    with pytest.raises(trainer.NonFiniteLossError, match="step 3"):
        _run(config)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")


def _event_scalars(model_dir):
    """{tag: {step: value}} of the TF2 scalar summaries in model_dir."""
    scalars = {}
    for path in sorted(pathlib.Path(model_dir).glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if array.ndim == 0:
                    scalars.setdefault(value.tag, {})[event.step] = float(array)
    return scalars


def test_pretraining_logs_health_monitors_and_warns_on_collapse(
    tmp_path, monkeypatch, caplog
):
    # Every possible projection std is <= 1/sqrt(d) (Jensen), so a
    # threshold of 2/sqrt(d) calls every log collapsed: the warning must
    # come at the 5th consecutive log (COLLAPSE_PATIENCE).
    monkeypatch.setattr(health, "PROJ_STD_COLLAPSE_FRACTION", 2.0)
    config = _smoke_config(
        tmp_path,
        mode="train",
        train_steps=health.COLLAPSE_PATIENCE,
        checkpoint_steps=1,
        keep_hub_module_max=-1,
    )
    with caplog.at_level("INFO", logger="absl"):
        _run(config)
    scalars = _event_scalars(tmp_path)
    steps = list(range(1, health.COLLAPSE_PATIENCE + 1))
    rows = 2 * config.train.train_batch_size  # Two views, one replica.
    feature_dim = 512  # ResNet-18.
    for step in steps:
        std = scalars["train/proj_std"][step]
        rank = scalars["train/rankme"][step]
        assert 0.0 < std <= 1.0 / np.sqrt(config.model.proj_out_dim) + 1e-6
        assert 1.0 <= rank <= min(rows, feature_dim) + 1e-3
    # The progress line: "... proj_std 0.088  rankme 12.3  ETA ...".
    assert re.search(r"proj_std \d\.\d{3}  rankme \d+\.\d  ETA", caplog.text)
    warnings = [r for r in caplog.records if "looks collapsed" in r.message]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    assert f"Step {steps[-1]}:" in warnings[0].message


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    config = _smoke_config(
        tmp_path, mode="train", checkpoint=str(tmp_path / "nowhere")
    )
    with pytest.raises(checkpoints.CheckpointError, match="nowhere"):
        _run(config)


def test_incompatible_checkpoint_names_the_mismatch(tmp_path):
    _run(
        _smoke_config(
            tmp_path / "r18",
            mode="train",
            train_steps=1,
            keep_hub_module_max=-1,
        )
    )
    config = _smoke_config(
        tmp_path / "r34",
        mode="train",
        resnet_depth=34,
        checkpoint=str(tmp_path / "r18"),
    )
    with pytest.raises(checkpoints.CheckpointError, match="resnet_depth=18"):
        _run(config)


def test_finished_model_dir_says_so_and_evaluates(tmp_path, caplog):
    config = _smoke_config(tmp_path, train_steps=1, keep_hub_module_max=-1)
    _run(config)
    with caplog.at_level("INFO", logger="absl"):
        results = _run(config)
    assert "already finished" in caplog.text
    assert results["global_step"] == 1


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step(tmp_path):
    proc = subprocess.Popen(
        _mock_run_cmd(
            f"--model_dir={tmp_path}",
            "--train_steps=100000",
            "--checkpoint_steps=100000",
            "--mode=train",
        ),
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.time() + 300
    for line in proc.stderr:
        if "step 3/" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    proc.stderr.read()
    assert proc.wait(timeout=120) == trainer.PREEMPTED_EXIT_CODE
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest is not None
    assert int(latest.rsplit("-", 1)[1]) >= 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_smoke_on_loopback(tmp_path):
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    procs = []
    for index in range(2):
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(
                {
                    "cluster": {"worker": workers},
                    "task": {"type": "worker", "index": index},
                }
            ),
        )
        procs.append(
            subprocess.Popen(
                _mock_run_cmd(
                    f"--model_dir={tmp_path}",
                    "--mode=train",
                    "--keep_hub_module_max=-1",
                ),
                env=env,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        )
    outputs = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "MultiWorkerMirroredStrategy with 2 replica" in outputs[0]
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")


def test_eval_mode_evaluates_the_latest_checkpoint_and_stops(tmp_path):
    # Like the reference: evaluate each new checkpoint, starting from the
    # latest, and stop once the last training step has been evaluated.
    _run(_smoke_config(tmp_path, mode="train", keep_hub_module_max=-1))
    assert not (tmp_path / "saved_model").exists()  # -1: no export.
    # An earlier export, which keep_hub_module_max=0 (keep all) keeps.
    (tmp_path / "saved_model" / "1").mkdir(parents=True)
    eval_config = _smoke_config(tmp_path, mode="eval", keep_hub_module_max=0)
    assert _run(eval_config) is None
    # One export per evaluated checkpoint, named by its step.
    exports = sorted(p.name for p in (tmp_path / "saved_model").iterdir())
    assert exports == ["1", "2"]
    assert (tmp_path / "saved_model" / "2" / "saved_model.pb").exists()
    record = json.loads((tmp_path / "result_2.json").read_text())
    assert record["global_step"] == 2
    assert 0.0 <= record["eval/label_top_1_accuracy"] <= 1.0
    assert (tmp_path / "result.json").read_text() == (
        tmp_path / "result_2.json"
    ).read_text()
