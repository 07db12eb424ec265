"""Tests of scripts/plot_run.py's figures: curves, preview, t-SNE maps."""

import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf import config as config_lib
from simclr_tf import export, run_info
from simclr_tf.data import augment
from simclr_tf.models import factory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import plot_run  # noqa: E402

SIZE = 16


def test_curves_row_has_labelled_axes_and_knn_marker():
    plt = plot_run._matplotlib()
    scalars = {
        "train/supervised_loss": [(2, 1.5), (4, 1.0)],
        "train/supervised_acc": [(2, 0.4), (4, 0.6)],
        "eval/label_top_1_accuracy": [(4, 0.7)],
        "eval/knn_top_1_accuracy": [(4, 0.8)],
    }
    fig, axes = plt.subplots(1, 2)
    plot_run._plot_run_row(axes, "linear_eval", scalars)
    loss_ax, acc_ax = axes
    for ax in axes:
        assert ax.get_xlabel() == "training step of linear_eval"
    assert (loss_ax.get_ylabel(), acc_ax.get_ylabel()) == ("loss", "accuracy")
    lines = {line.get_label(): line for line in acc_ax.get_lines()}
    knn = lines["kNN, test"]
    assert list(knn.get_xdata()) == [4] and list(knn.get_ydata()) == [0.8]
    assert list(lines["linear head, test"].get_ydata()) == [0.7]
    texts = [t.get_text() for t in acc_ax.texts]
    assert "80.0%" in texts and "70.0%" in texts
    plt.close(fig)


def test_plot_curves_gives_each_run_its_own_row(tmp_path):
    runs = {
        "pretrain": {"train/contrast_loss": [(10, 5.0), (20, 4.0)]},
        "linear_eval": {"eval/knn_top_1_accuracy": [(3, 0.9)]},
    }
    path = plot_run.plot_curves(runs, str(tmp_path / "curves.png"))
    with Image.open(path) as image:
        assert image.size == (1200, 2 * 360)


def test_plot_augmentations_tiles(tmp_path):
    rng = np.random.default_rng(0)
    originals = rng.uniform(size=(2, SIZE, SIZE, 3))
    views = rng.uniform(size=(2, SIZE, SIZE, 9))
    path = plot_run.plot_augmentations(
        originals, views, str(tmp_path / "a.png")
    )
    with Image.open(path) as image:
        # 2 rows x (original + 3 views) of 1.25-inch tiles, at 100 dpi.
        assert image.size == (round(100 * (1.25 * 4 + 0.4)), 2 * 125 + 90)


def _run_dir(root: Path, digits: Path, seed: int) -> tuple[Path, object]:
    """A run directory (config.json + checkpoint) of a small model."""
    config = config_lib.Config(
        data=config_lib.DataConfig(
            dataset=f"folder:{digits}",
            train_split="train",
            eval_split="test",
            image_size=SIZE,
        ),
        model=config_lib.ModelConfig(resnet_depth=18, resnet_base_width=16),
        train=config_lib.TrainConfig(model_dir=str(root)),
        eval=config_lib.EvalConfig(eval_batch_size=16),
    )
    keras.utils.set_random_seed(seed)
    model = factory.build_model(config, None)
    config_lib.write_json(config, str(root))
    run_info.write(
        run_info.RunInfo(
            num_classes=None,
            class_names=None,
            num_train_examples=6,
            num_eval_examples=15,
            dtype_policy="float32",
            total_steps=1,
        ),
        str(root),
    )
    tf.train.Checkpoint(model=model).save(str(root / "ckpt"))
    return root, model


def _digit_folder(root: Path) -> int:
    """A labelled folder of 3 classes; returns the number of test images."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 2), ("test", 5)):
        for label in range(3):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8 + label, 8, 3), np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return 3 * 5


@pytest.mark.slow
def test_embedding_features_come_from_each_runs_encoder(tmp_path):
    digits = tmp_path / "digits"
    num_test = _digit_folder(digits)
    run_a, model_a = _run_dir(tmp_path / "a", digits, seed=1)
    run_b, model_b = _run_dir(tmp_path / "b", digits, seed=2)
    # Run a is read from its export, run b from its checkpoint.
    export.export_checkpoint(str(run_a))
    got_a = plot_run.embedding_features(str(run_a))
    got_b = plot_run.embedding_features(str(run_b))
    assert got_a["source"].startswith("export ")
    assert got_b["source"].startswith("checkpoint ")
    width = model_a(tf.zeros((1, SIZE, SIZE, 3)))["final_avg_pool"].shape[-1]
    for got in (got_a, got_b):
        assert got["features"].shape == (num_test, width)
        assert got["split"] == "test"
        assert np.bincount(got["labels"]).tolist() == [5, 5, 5]
        assert got["class_names"] == ("0", "1", "2")
    # Independent reference: each test PNG, eval preprocessing, each model.
    for label in range(3):
        files = sorted((digits / "test" / str(label)).glob("*.png"))
        images = tf.stack(
            [
                augment.preprocess_for_eval(
                    tf.constant(np.asarray(Image.open(f)) / 255.0, tf.float32),
                    height=SIZE,
                    width=SIZE,
                )
                for f in files
            ]
        )
        for model, got in ((model_a, got_a), (model_b, got_b)):
            expected = model(images, training=False)["final_avg_pool"]
            rows = got["features"][got["labels"] == label]
            # Same set of rows (the dataset's order within a class is its
            # own): match each expected row to its nearest row.
            distance = np.abs(
                rows[:, None, :] - expected.numpy()[None, :, :]
            ).max(axis=-1)
            assert distance.min(axis=0).max() < 1e-4
    # The two panels' inputs are two different encoders.
    assert np.abs(got_a["features"] - got_b["features"]).max() > 1e-2
    path = plot_run.write_embedding(
        {"a": str(run_a), "b": str(run_b)}, str(tmp_path / "embedding.png")
    )
    with Image.open(path) as image:
        assert image.size == (1240, 640)  # Two panels: figsize (12.4, 6.4)
