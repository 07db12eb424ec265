"""A run refuses before it writes (issue 17, items 1-3): an incompatible
model_dir or --checkpoint leaves every file as it was, a missing or
unlabelled eval split fails before the first step, and mode=eval with
nothing to evaluate says so and exits non-zero."""

import hashlib
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import run
from simclr_tf import cli, experiment, preflight
from simclr_tf import config as config_lib
from simclr_tf import run_info as run_info_lib
from simclr_tf.data import sources

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE = ROOT / "flags" / "smoke.cfg"


def _tree_hashes(root: pathlib.Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run_py(*args: str) -> int:
    """run.py's main in-process on mock TFDS data; its exit status."""
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["run.py", f"--flagfile={SMOKE}", *args])
    try:
        with tfds.testing.mock_data(num_examples=48):
            run.main(["run.py"])
    except SystemExit as e:
        return e.code
    finally:
        cli.FLAGS.unparse_flags()
    return 0


@pytest.fixture(scope="module")
def trained_r18(tmp_path_factory):
    """A finished 1-step ResNet-18 smoke run (checkpoint, config.json,
    run_info.json, flags.cfg, events, results)."""
    model_dir = tmp_path_factory.mktemp("r18")
    assert (
        _run_py(
            f"--model_dir={model_dir}",
            "--train_steps=1",
            "--keep_hub_module_max=0",
        )
        == 0
    )
    assert tf.train.latest_checkpoint(str(model_dir))
    return model_dir


def test_rerun_with_another_architecture_changes_nothing(trained_r18, capsys):
    before = _tree_hashes(trained_r18)
    assert {"config.json", "run_info.json", "flags.cfg"} <= set(before)
    status = _run_py(
        f"--model_dir={trained_r18}",
        "--train_steps=1",
        "--resnet_depth=34",
        "--proj_out_dim=64",
    )
    err = capsys.readouterr().err
    assert status == 2
    (line,) = [x for x in err.splitlines() if x.startswith("run.py: error")]
    assert "resnet_depth=18 there vs 34 here" in line
    assert "proj_out_dim=128 there vs 64 here" in line
    assert f"--flagfile={trained_r18 / 'flags.cfg'}" in line
    assert "new --model_dir" in line
    assert _tree_hashes(trained_r18) == before


def test_incompatible_checkpoint_writes_nothing(trained_r18, tmp_path, capsys):
    before = _tree_hashes(trained_r18)
    model_dir = tmp_path / "r34"
    status = _run_py(
        f"--model_dir={model_dir}",
        "--resnet_depth=34",
        f"--checkpoint={trained_r18}",
    )
    assert status == 2
    assert "resnet_depth=18 in the checkpoint vs 34 here" in (
        capsys.readouterr().err
    )
    assert not model_dir.exists()
    assert _tree_hashes(trained_r18) == before


def test_eval_with_nothing_to_evaluate_exits_non_zero(tmp_path, capsys):
    status = _run_py(
        f"--model_dir={tmp_path}", "--mode=eval", "--eval_timeout_secs=0"
    )
    assert status == 2
    assert "nothing was evaluated" in capsys.readouterr().err


# --------------------------------------------------------------------------
# The checks themselves, on hand-written model_dirs and image folders.


def _info(num_classes, names=None):
    return sources.DatasetInfo(100, 10, num_classes, names)


def _fake_run_dir(path, config, num_classes, names=None):
    """A model_dir with a checkpoint, config.json and run_info.json."""
    tf.train.Checkpoint(v=tf.Variable(1.0)).save(str(path / "ckpt"))
    config_lib.write_json(config, str(path))
    run_info_lib.write(
        run_info_lib.RunInfo(num_classes, names, 100, 10, "float32", 5),
        str(path),
    )


@pytest.mark.parametrize(
    "ours, info, fragment",
    [
        (dict(), _info(5, ("a", "b", "c", "d", "e")), "classes=3 there vs 5"),
        (dict(), _info(None), "classes=3 there vs none (unlabelled) here"),
        (dict(), _info(3, ("a", "x", "c")), "class 1='b' there vs 'x' here"),
        (
            dict(lineareval_while_pretraining=False),
            _info(3, ("a", "b", "c")),
            "supervised head present there vs absent here",
        ),
        (dict(image_size=32), _info(3, ("a", "b", "c")), "different stem"),
        (dict(sk_ratio=0.0625), _info(3, ("a", "b", "c")), "sk_ratio=0.0"),
        (
            dict(optimizer="adam"),
            _info(3, ("a", "b", "c")),
            "optimizer='lars' there vs 'adam' here",
        ),
        (
            dict(mixed_precision="float16"),
            _info(3, ("a", "b", "c")),
            "float32 there vs --mixed_precision=float16 here",
        ),
    ],
)
def test_model_dir_mismatch_names_the_field(tmp_path, ours, info, fragment):
    theirs = config_lib.Config(
        train=config_lib.TrainConfig(model_dir=str(tmp_path))
    )
    _fake_run_dir(tmp_path, theirs, 3, ("a", "b", "c"))
    config = config_lib.replace(theirs, **ours)
    with pytest.raises(preflight.ModelDirError, match="new --model_dir") as e:
        preflight.check_model_dir(config, info)
    assert fragment in str(e.value)
    # The same flags (e.g. a longer run) resume without complaint.
    preflight.check_model_dir(
        config_lib.replace(theirs, train_steps=50), _info(3, ("a", "b", "c"))
    )


def test_require_labels_message_and_labelled_data():
    _info(3).require_labels("d", "train_mode=finetune", "Fix.")  # No error.
    with pytest.raises(sources.DatasetError) as e:
        _info(None).require_labels("d", "train_mode=finetune", "Fix.")
    assert str(e.value) == (
        "Received: train_mode=finetune on 'd', which has no labels. Fix."
    )


def test_model_dir_without_checkpoints_is_not_checked(tmp_path):
    theirs = config_lib.Config(
        train=config_lib.TrainConfig(model_dir=str(tmp_path))
    )
    config_lib.write_json(theirs, str(tmp_path))
    other = config_lib.replace(theirs, resnet_depth=18)
    preflight.check_model_dir(other, _info(3))


def _write_images(folder: pathlib.Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (8, 8, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def _folder_config(root, model_dir, **overrides):
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["run.py", f"--flagfile={SMOKE}"])
    flat = config_lib.to_flat(cli.config_from_flags())
    cli.FLAGS.unparse_flags()
    flat.update(dataset=f"folder:{root}", model_dir=str(model_dir), **overrides)
    return config_lib.from_flat(flat)


@pytest.fixture
def two_class_train_only(tmp_path):
    root = tmp_path / "images"
    for name in ("ant", "bee"):
        _write_images(root / "train" / name, 4)
    return root


def test_missing_eval_split_fails_before_writing(
    two_class_train_only, tmp_path, capsys
):
    model_dir = tmp_path / "run"
    cli.FLAGS.unparse_flags()
    cli.FLAGS(
        [
            "run.py",
            f"--flagfile={SMOKE}",
            f"--dataset=folder:{two_class_train_only}",
            f"--model_dir={model_dir}",
        ]
    )
    try:
        with pytest.raises(SystemExit) as e:
            run.main(["run.py"])
    finally:
        cli.FLAGS.unparse_flags()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "split='test'" in err and "add a test/ subfolder" in err
    # No checkpoint, no flags.cfg: nothing was written, no step was taken.
    assert not model_dir.exists()


def test_unlabelled_eval_split_fails_in_prepare(two_class_train_only, tmp_path):
    _write_images(two_class_train_only / "test", 3)  # No class subfolders.
    config = _folder_config(two_class_train_only, tmp_path / "run")
    with pytest.raises(sources.DatasetError, match="no labels"):
        experiment.prepare(config)
    # Pretraining alone needs no eval split.
    experiment.prepare(config_lib.replace(config, mode="train"))


def test_evaluating_unlabelled_data_fails_in_prepare(tmp_path):
    _write_images(tmp_path / "flat", 6)
    config = _folder_config(
        tmp_path / "flat", tmp_path / "run", holdout_fraction=0.5
    )
    with pytest.raises(sources.DatasetError, match="--mode=train"):
        experiment.prepare(config)
    finetune = config_lib.replace(config, mode="train", train_mode="finetune")
    with pytest.raises(sources.DatasetError, match="train_mode=finetune"):
        experiment.prepare(finetune)
    assert not (tmp_path / "run").exists()
