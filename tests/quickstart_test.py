"""Tests of the quickstart: digits export, plots, the base-width flag."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.datasets import load_digits

from simclr_tf import config as config_lib
from simclr_tf.models import factory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import plot_run  # noqa: E402
import quickstart  # noqa: E402

from tests.helpers import parse_run_py  # noqa: E402


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    counts = quickstart.write_digits(str(root))
    return root, counts


def _pngs(folder):
    return sorted(p for p in folder.rglob("*.png"))


def test_write_digits_counts_classes_and_stratification(digits_root):
    root, counts = digits_root
    assert counts == {"train": 1437, "test": 360}
    target = load_digits().target
    per_class = np.bincount(target, minlength=10)  # 178, 182, 177, ...
    for split, total in (("train", 1437), ("test", 360)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == [str(c) for c in range(10)]
        assert len(_pngs(root / split)) == total
        for c in range(10):
            n = len(list((root / split / str(c)).glob("*.png")))
            # Stratified: each class keeps its share of the split, +-1.
            assert abs(n - per_class[c] * total / len(target)) <= 1.0
            names = {int(p.stem) for p in (root / split / str(c)).iterdir()}
            assert all(target[i] == c for i in names)
    train = {int(p.stem) for p in _pngs(root / "train")}
    test = {int(p.stem) for p in _pngs(root / "test")}
    assert not train & test and len(train | test) == 1797


def test_write_digits_pngs_hold_the_scaled_pixels(digits_root):
    root, _ = digits_root
    images = load_digits().images  # (1797, 8, 8), values 0..16
    for path in _pngs(root)[::200]:
        with Image.open(path) as image:
            assert image.size == (8, 8) and image.mode == "L"
            pixels = np.asarray(image)
        expected = np.round(images[int(path.stem)] * 255 / 16)
        np.testing.assert_array_equal(pixels, expected)


def _write_events(model_dir):
    writer = tf.summary.create_file_writer(str(model_dir))
    with writer.as_default():
        for step in (10, 20, 30):
            tf.summary.scalar("train/contrast_loss", 5.0 - step / 10, step)
            tf.summary.scalar("train/contrast_acc", step / 100, step)
            tf.summary.scalar("train/supervised_acc", step / 50, step)
        tf.summary.scalar("eval/label_top_1_accuracy", 0.75, step=30)
        tf.summary.image("train/augmented_views", tf.zeros((1, 4, 4, 3)), 0)
    writer.close()


def test_read_scalars_returns_the_written_values(tmp_path):
    _write_events(tmp_path)
    scalars = plot_run.read_scalars(str(tmp_path))
    assert set(scalars) == {
        "train/contrast_loss",
        "train/contrast_acc",
        "train/supervised_acc",
        "eval/label_top_1_accuracy",
    }
    assert scalars["train/contrast_loss"] == [
        (10, 4.0),
        (20, 3.0),
        (30, 2.0),
    ]
    np.testing.assert_allclose(
        [v for _, v in scalars["train/contrast_acc"]], [0.1, 0.2, 0.3]
    )
    assert scalars["eval/label_top_1_accuracy"] == [(30, 0.75)]


def test_read_scalars_without_events_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="No TensorBoard event"):
        plot_run.read_scalars(str(tmp_path))


def test_plot_curves_writes_a_png_with_content(tmp_path):
    _write_events(tmp_path / "run")
    path = plot_run.plot_curves(
        {"run": plot_run.read_scalars(str(tmp_path / "run"))},
        str(tmp_path / "out" / "curves.png"),
    )
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1200, 360)  # One run: figsize (12, 3.6), 100 dpi
        pixels = np.asarray(image.convert("L"))
    # Curves and axes: far from a blank (white) canvas.
    assert (pixels < 128).mean() > 0.005


def test_plot_curves_adds_health_panels_only_with_their_data(tmp_path):
    # Run "a" logged the health monitors, run "b" did not: two more panels
    # per row (6 inches each), left blank in "b"'s row.
    _write_events(tmp_path / "a")
    _write_events(tmp_path / "b")
    writer = tf.summary.create_file_writer(str(tmp_path / "a"))
    with writer.as_default():
        for step in (10, 20, 30):
            tf.summary.scalar("train/proj_std", 0.08, step)
            tf.summary.scalar("train/rankme", 40.0 - step, step)
    writer.close()
    runs = {
        label: plot_run.read_scalars(str(tmp_path / label))
        for label in ("a", "b")
    }
    assert [tag for tag, _ in plot_run.health_panels(runs)] == [
        "train/proj_std",
        "train/rankme",
    ]
    assert plot_run.health_panels({"b": runs["b"]}) == []
    path = plot_run.plot_curves(runs, str(tmp_path / "curves.png"))
    with Image.open(path) as image:
        assert image.size == (2400, 720)  # 2 rows x 4 panels


def test_write_preview_grid_shape(tmp_path, digits_root):
    root, _ = digits_root
    config = config_lib.Config(
        data=config_lib.DataConfig(
            dataset=f"folder:{root}",
            train_split="train",
            eval_split="test",
            image_size=16,
            use_blur=False,
            seed=0,
        )
    )
    run = tmp_path / "run"
    config_lib.write_json(config, str(run))
    path = plot_run.write_preview(str(run), str(tmp_path / "a.png"), 3)
    with Image.open(path) as image:
        # 3 rows x (original + 4 views) of 1.25-inch tiles plus margins
        # and title, at 100 dpi.
        assert image.size == (
            round(100 * (1.25 * 5 + 0.4)),
            1.25 * 3 * 100 + 90,
        )


@pytest.mark.parametrize("base_width", [16, 64])
def test_resnet_base_width_sets_every_block_width(base_width):
    config = config_lib.Config(
        data=config_lib.DataConfig(image_size=16),
        model=config_lib.ModelConfig(
            resnet_depth=18, resnet_base_width=base_width
        ),
    )
    encoder = factory.build_model(config, 10).encoder
    stem_kernel = encoder.stem.convs[0].kernel
    assert tuple(stem_kernel.shape) == (3, 3, 3, base_width)
    widths = [g.out_filters for g in encoder.block_groups]
    assert widths == [base_width * 2**i for i in range(4)]
    features = encoder(tf.zeros((2, 16, 16, 3)))["final_avg_pool"]
    assert features.shape == (2, 8 * base_width)


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_residual_bn_sets_the_last_bn_gamma(zero_init):
    config = config_lib.Config(
        data=config_lib.DataConfig(image_size=16),
        model=config_lib.ModelConfig(
            resnet_depth=18,
            resnet_base_width=8,
            zero_init_residual_bn=zero_init,
        ),
    )
    encoder = factory.build_model(config, 10).encoder
    blocks = [b for g in encoder.block_groups for b in g.blocks]
    assert len(blocks) == 8  # ResNet-18: 2 basic blocks per group.
    expected = 0.0 if zero_init else 1.0
    for block in blocks:
        np.testing.assert_array_equal(block.bn2.gamma.numpy(), expected)
        np.testing.assert_array_equal(block.bn1.gamma.numpy(), 1.0)


def test_resnet_base_width_is_validated():
    with pytest.raises(config_lib.ConfigError, match="resnet_base_width=7"):
        config_lib.Config(model=config_lib.ModelConfig(resnet_base_width=7))


def _parse_run_py(*args):
    """The config run.py builds from the quickstart recipe plus `args`."""
    return parse_run_py(ROOT / "flags" / "quickstart.cfg", *args)


def test_stage_configs_equal_the_documented_run_py_commands():
    # flags/quickstart.cfg's header gives the run.py command of each stage.
    work = "/tmp/simclr_quickstart"
    digits = f"--dataset=folder:{work}/digits"
    linear = [
        "--train_mode=finetune",
        "--fine_tune_after_block=4",
        "--zero_init_logits_layer",
        "--noglobal_bn",
        "--optimizer=momentum",
        "--learning_rate=2.0",
        "--weight_decay=0",
        "--warmup_epochs=0",
        "--train_epochs=60",
    ]
    configs = quickstart.stage_configs(_parse_run_py("--seed=1"), work)
    assert configs["pretrain"] == _parse_run_py(
        "--seed=1", digits, f"--model_dir={work}/pretrain"
    )
    assert configs["linear_eval"] == _parse_run_py(
        "--seed=1",
        digits,
        *linear,
        f"--checkpoint={work}/pretrain",
        f"--model_dir={work}/linear_eval",
    )
    assert configs["random_linear_eval"] == _parse_run_py(
        "--seed=1",
        digits,
        *linear,
        "--nozero_init_residual_bn",
        "--keep_hub_module_max=-1",
        f"--model_dir={work}/random_linear_eval",
    )


def _parse_flag(value: str, default):
    """A flag-file value as the type of the field's default."""
    if isinstance(default, bool):
        return value == "True"
    if default is None:  # seed (int) or a path (str).
        try:
            return int(value)
        except ValueError:
            return value
    return type(default)(value)


@pytest.mark.slow
def test_tiny_folder_run_then_plots(tmp_path, digits_root):
    from simclr_tf import experiment

    root, _ = digits_root
    with open(ROOT / "flags" / "quickstart.cfg") as f:
        recipe = [line.strip() for line in f if line.startswith("--")]
    values = {}
    for line in recipe:
        name, _, value = line[2:].partition("=")
        values[name] = value
    assert values["dataset"].startswith("folder:")
    flat = config_lib.to_flat(config_lib.Config())
    for name, value in values.items():
        flat[name] = _parse_flag(value, flat[name])
    flat.update(
        dataset=f"folder:{root}",
        train_steps=4,
        steps_per_loop=2,
        train_batch_size=32,
        model_dir=str(tmp_path / "run"),
        keep_hub_module_max=-1,
    )
    config = config_lib.from_flat(flat)
    results = experiment.run(config)
    assert 0.0 <= results["eval/knn_top_1_accuracy"] <= 1.0
    paths = plot_run.plot_runs(
        {"run": str(tmp_path / "run")}, str(tmp_path / "plots")
    )
    assert [os.path.basename(p) for p in paths] == [
        "curves.png",
        "augmentations.png",
    ]
    scalars = plot_run.read_scalars(str(tmp_path / "run"))
    assert [s for s, _ in scalars["train/contrast_loss"]] == [2, 4]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["global_step"] == 4


def test_format_report_puts_both_encoders_side_by_side(tmp_path):
    (tmp_path / "pretrain" / "saved_model" / "562").mkdir(parents=True)
    flags = {
        "knn_k": 20,
        "resnet_depth": 18,
        "resnet_base_width": 16,
        "image_size": 16,
    }
    pretrain = {
        "global_step": 562,
        "flags": flags,
        "seconds": 216.0,
        "eval/label_top_1_accuracy": 0.978,
    }
    simclr = {
        "eval/label_top_1_accuracy": 0.969,
        "eval/knn_top_1_accuracy": 0.967,
    }
    random = {
        "eval/label_top_1_accuracy": 0.756,
        "eval/knn_top_1_accuracy": 0.917,
    }
    text = quickstart.format_report(
        str(tmp_path), pretrain, simclr, random, 294.0
    )
    lines = text.splitlines()
    row = next(line for line in lines if "SimCLR encoder" in line)
    assert row.split()[-2:] == ["96.9", "96.7"]
    row = next(line for line in lines if "random encoder" in line)
    assert row.split()[-2:] == ["75.6", "91.7"]
    row = next(line for line in lines if "SimCLR - random" in line)
    assert row.split()[-2:] == ["+21.3", "+5.0"]
    assert "runtime: 4.9 min (pretraining and its eval 3.6 min)" in text
    assert str(tmp_path / "pretrain" / "saved_model" / "562") in text
    assert str(tmp_path / "pretrain" / "ckpt-562") in text
