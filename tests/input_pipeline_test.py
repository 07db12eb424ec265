"""Tests of simclr_tf.data.input_pipeline and .sources: image folders, TFDS
(mocked) and in-memory arrays."""

import dataclasses
import hashlib
import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from simclr_tf import config
from simclr_tf.data import input_pipeline as ip
from simclr_tf.data import sources
from tests.helpers import two_replica_strategy

SIZE = 16
# Dominant colour of each class's images, so labels can be checked.
CLASS_COLOURS = {"ant": (220, 40, 40), "bee": (40, 220, 40)}


def _noise_image(rng, colour, shape):
    noise = rng.integers(-30, 30, shape + (3,))
    return np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)


def _save(path, array, fmt=None, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **kw)


def _write_class_images(root, rng, per_class, colours=CLASS_COLOURS):
    """per_class colourful images per class, in JPEG, PNG, BMP and GIF."""
    formats = ["png", "jpg", "bmp", "gif"]
    for name, colour in colours.items():
        for i in range(per_class):
            shape = (18 + i % 5, 22 + 3 * (i % 3))
            ext = formats[i % len(formats)]
            _save(
                os.path.join(root, name, f"{i}.{ext}"),
                _noise_image(rng, colour, shape),
            )


def _write_odd_files(root, rng):
    """A grayscale PNG, an RGBA PNG (class bee), a corrupt JPEG and a
    truncated PNG (class ant). Returns the number of unreadable files."""
    gray = rng.integers(0, 255, (20, 20), dtype=np.uint8)
    _save(os.path.join(root, "bee", "gray.png"), gray)
    rgba = np.concatenate(
        [
            _noise_image(rng, CLASS_COLOURS["bee"], (19, 17)),
            gray[:19, :17, None],
        ],
        axis=-1,
    )
    _save(os.path.join(root, "bee", "rgba.png"), rgba)
    with open(os.path.join(root, "ant", "corrupt.jpg"), "wb") as f:
        f.write(b"this is not a JPEG file")
    buffer = io.BytesIO()
    Image.fromarray(_noise_image(rng, (0, 0, 0), (30, 30))).save(buffer, "PNG")
    with open(os.path.join(root, "ant", "truncated.png"), "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return 2


@pytest.fixture
def class_folder(tmp_path):
    """ant/ and bee/: 10 colourful images each, plus gray, RGBA, corrupt and
    truncated files. Readable: ant 10, bee 12."""
    rng = np.random.default_rng(0)
    root = str(tmp_path / "classes")
    _write_class_images(root, rng, 10)
    _write_odd_files(root, rng)
    return root


def _data(root, **kw):
    defaults = dict(
        dataset=config.FOLDER_PREFIX + root,
        image_size=SIZE,
        use_blur=False,
        seed=11,
    )
    return config.DataConfig(**(defaults | kw))


def _batches(ds, n=None):
    out = []
    for i, (x, y) in enumerate(ds):
        if n is not None and i >= n:
            break
        out.append((x.numpy(), y.numpy()))
    return out


def _build(data, *, is_training, pretrain, source=None, **kw):
    """The pipeline of `data` as a run builds it: 2 views to pretrain."""
    return ip.build_dataset(
        source or sources.open_source(data),
        data,
        is_training=is_training,
        pretrain=pretrain,
        num_views=2 if is_training and pretrain else 1,
        **kw,
    )


def _build_distributed(strategy, data, *, is_training, pretrain, **kw):
    return ip.build_distributed_dataset(
        strategy,
        sources.open_source(data),
        data,
        is_training=is_training,
        pretrain=pretrain,
        num_views=2 if is_training and pretrain else 1,
        **kw,
    )


def _decoded(data, split):
    """(uint8 image, label) of each record of a split, in order."""
    source = sources.open_source(data)
    return [(source.decode(r), y) for r, y in source.records(split)]


def _digest(image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


# --------------------------------------------------------------------------
# Image folders.


def test_folder_info_holdout_and_skipped_files(class_folder, caplog):
    caplog.set_level(logging.INFO)
    # absl's logger keeps its own level, which an in-process absl.app run
    # earlier in the session may have raised.
    caplog.set_level(logging.INFO, logger="absl")
    data = _data(class_folder, holdout_fraction=0.2, eval_split="val")
    source = sources.open_source(data)
    info = source.info
    # Holdout per class of all listed files: ant 12 files -> round(2.4) = 2
    # held, bee 12 -> 2 held; the 2 unreadable ant files are then dropped
    # from whichever side they fell on.
    assert info.num_classes == 2
    assert info.class_names == ("ant", "bee")
    assert info.num_skipped_files == 2
    assert info.num_train_examples + info.num_eval_examples == 22
    assert info.num_eval_examples in (2, 3, 4)
    warnings = [
        r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()
    ]
    assert len(warnings) == 1 and "Skipped 2 unreadable" in warnings[0]
    # One summary line of what the scan found.
    (summary,) = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("Image folder")
    ]
    assert "2 classes (ant, bee)" in summary
    assert f"train {info.num_train_examples}, val {info.num_eval_examples}" in (
        summary
    )
    assert (
        "(one folder)" in summary
        and "files skipped (do not decode): 2" in summary
    )
    # The folder is scanned once, when opened: reading its info again and
    # building pipelines of both splits reports nothing more.
    assert source.info == info
    for split in ("train", "val"):
        _build(
            data,
            source=source,
            batch_size=4,
            is_training=False,
            pretrain=False,
            split=split,
        )
    again = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(again) == 1


def test_folder_holdout_is_disjoint_and_deterministic(class_folder):
    data = _data(class_folder, holdout_fraction=0.2, eval_split="val")

    def digests(split, seed):
        images = _decoded(dataclasses.replace(data, seed=seed), split)
        return [(_digest(x), int(y)) for x, y in images]

    train, held = digests("train", 1), digests("val", 1)
    assert not {d for d, _ in train} & {d for d, _ in held}
    assert held == digests("val", 2)  # Independent of the run seed.
    assert len(train) + len(held) == 22


def test_folder_decodes_every_format_to_rgb_with_right_labels(class_folder):
    images = _decoded(_data(class_folder), "train")
    assert len(images) == 22
    grays = 0
    for image, label in images:
        assert image.dtype == tf.uint8 and image.shape.rank == 3
        assert image.shape[-1] == 3
        image = image.numpy().astype(int)
        mean = image.reshape(-1, 3).mean(0)
        if np.ptp(image, axis=-1).max() == 0:
            grays += 1  # The grayscale PNG, tiled to RGB.
            continue
        # Red images are class 0 (ant), green ones class 1 (bee).
        assert int(label) == int(np.argmax(mean[:2])), (mean, int(label))
    assert grays == 1


@pytest.mark.parametrize(
    "is_training, pretrain, channels",
    [(True, True, 6), (True, False, 3), (False, True, 3), (False, False, 3)],
)
def test_folder_pipeline_shapes_per_mode(
    class_folder, is_training, pretrain, channels
):
    data = _data(class_folder)
    ds = _build(
        data,
        batch_size=8,
        is_training=is_training,
        pretrain=pretrain,
        split="train",
    )
    batches = _batches(ds, n=4)
    if is_training:
        assert len(batches) == 4  # Repeats past the 22 examples.
        assert all(x.shape == (8, SIZE, SIZE, channels) for x, _ in batches)
    else:
        # One pass, last batch partial: 22 = 8 + 8 + 6.
        assert [len(x) for x, _ in batches] == [8, 8, 6]
        assert all(x.shape[1:] == (SIZE, SIZE, 3) for x, _ in batches)
    for x, y in batches:
        assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
        assert y.dtype == np.float32 and y.shape == (len(x), 2)
        np.testing.assert_array_equal(y.sum(1), 1.0)
        assert set(np.unique(y)) <= {0.0, 1.0}


def test_eval_labels_match_images(class_folder):
    ds = _build(
        _data(class_folder, image_size=20),
        batch_size=22,
        is_training=False,
        pretrain=False,
        split="train",
    )
    ((x, y),) = _batches(ds)
    mean = x.reshape(len(x), -1, 3).mean(1)
    colourful = np.ptp(mean, axis=1) > 0.1
    assert colourful.sum() == 21  # All but the grayscale one.
    np.testing.assert_array_equal(
        np.argmax(mean[colourful, :2], 1), np.argmax(y[colourful], 1)
    )


def test_two_replicas_get_half_the_global_batch(class_folder):
    strategy = two_replica_strategy()
    data = _data(class_folder)
    ds = _build_distributed(
        strategy, data, global_batch_size=8, is_training=True, pretrain=True
    )
    images, labels = next(iter(ds))
    local = strategy.experimental_local_results(images)
    assert len(local) == 2
    assert all(t.shape == (4, SIZE, SIZE, 6) for t in local)
    assert all(
        t.shape == (4, 2) for t in strategy.experimental_local_results(labels)
    )
    # Two replicas see different images.
    assert not np.allclose(local[0].numpy(), local[1].numpy())
    # A run resumed after 1 step gets the uninterrupted run's 2nd step.
    iterator = iter(
        _build_distributed(
            strategy, data, global_batch_size=8, is_training=True, pretrain=True
        )
    )
    next(iterator)
    second = strategy.experimental_local_results(next(iterator)[0])
    resumed = _build_distributed(
        strategy,
        data,
        global_batch_size=8,
        is_training=True,
        pretrain=True,
        start_batch=1,
    )
    first = strategy.experimental_local_results(next(iter(resumed))[0])
    for a, b in zip(second, first, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    eval_ds = _build_distributed(
        strategy,
        data,
        global_batch_size=8,
        is_training=False,
        pretrain=True,
        split="train",
    )
    seen = 0
    for images, _ in eval_ds:
        for t in strategy.experimental_local_results(images):
            assert t.shape[0] <= 4 and t.shape[1:] == (SIZE, SIZE, 3)
            seen += t.shape[0]
    assert seen == 22


def test_fixed_seed_gives_identical_batches(class_folder):
    def first_batches(**kw):
        ds = _build(
            _data(class_folder, **kw),
            batch_size=8,
            is_training=True,
            pretrain=True,
        )
        return _batches(ds, n=4)  # 32 examples: more than one epoch.

    a, b = first_batches(seed=5), first_batches(seed=5)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # A resumed run skipping 2 batches sees batches 2 and 3 again.
    resumed = _batches(
        _build(
            _data(class_folder, seed=5),
            batch_size=8,
            is_training=True,
            pretrain=True,
            start_batch=2,
        ),
        n=2,
    )
    for (xa, _), (xr, _) in zip(a[2:], resumed, strict=True):
        np.testing.assert_array_equal(xa, xr)
    c = first_batches(seed=6)
    assert not np.allclose(a[0][0], c[0][0])
    # Caching decoded images before augmentation changes nothing, also in
    # the second epoch (cached views would repeat there).
    cached = first_batches(seed=5, cache_dataset=True)
    for (xa, _), (xc, _) in zip(a, cached, strict=True):
        np.testing.assert_allclose(xa, xc, atol=1e-6)


def test_split_subfolders_and_missing_eval_class(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    rng = np.random.default_rng(1)
    root = str(tmp_path / "splits")
    _write_class_images(os.path.join(root, "train"), rng, 4)
    _write_class_images(
        os.path.join(root, "val"), rng, 3, {"bee": CLASS_COLOURS["bee"]}
    )
    data = _data(root, eval_split="val")
    info = sources.open_source(data).info
    assert (info.num_train_examples, info.num_eval_examples) == (8, 3)
    assert info.class_names == ("ant", "bee")
    assert any(
        "ant" in r.getMessage() and "val" in r.getMessage()
        for r in caplog.records
    )
    # val/ labels follow the train classes: bee is class 1.
    labels = [int(y) for _, y in _decoded(data, "val")]
    assert labels == [1, 1, 1]
    with pytest.raises(sources.DatasetError, match="'test'.*'train', 'val'"):
        _build(
            data, batch_size=2, is_training=False, pretrain=False, split="test"
        )


def test_eval_class_unknown_to_train_is_an_error(tmp_path):
    rng = np.random.default_rng(2)
    root = str(tmp_path / "splits")
    _write_class_images(os.path.join(root, "train"), rng, 2)
    _write_class_images(os.path.join(root, "val"), rng, 2, {"cow": (9, 9, 9)})
    with pytest.raises(sources.DatasetError, match="cow"):
        sources.open_source(_data(root, eval_split="val"))


def test_flat_folder_is_unlabeled_pretraining_only(tmp_path):
    rng = np.random.default_rng(3)
    root = str(tmp_path / "flat")
    for i in range(6):
        _save(
            os.path.join(root, f"{i}.png"),
            _noise_image(rng, (90,) * 3, (17, 23)),
        )
    data = _data(root)
    info = sources.open_source(data).info
    assert info.num_classes is None and info.num_train_examples == 6
    assert info.num_eval_examples == 0  # No eval split: training only.
    x, y = _batches(
        _build(data, batch_size=4, is_training=True, pretrain=True), 1
    )[0]
    assert x.shape == (4, SIZE, SIZE, 6) and y.shape == (4, 0)
    with pytest.raises(sources.DatasetError, match="no labels"):
        _build(data, batch_size=4, is_training=True, pretrain=False)
    with pytest.raises(sources.DatasetError, match="holdout_fraction"):
        _build(data, batch_size=4, is_training=False, pretrain=False)


def test_folder_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(
        sources.DatasetError, match=f"{missing} is not a directory"
    ):
        sources.open_source(_data(missing))
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(sources.DatasetError, match=f"no images.*{empty}"):
        sources.open_source(_data(str(empty)))


def test_preview_grid_from_a_folder(class_folder):
    data = _data(class_folder, use_blur=True)
    grid = ip.preview_grid(
        sources.open_source(data), data, num_images=3, num_views=2
    )
    # 3 rows, original + 2 views, each tile 16 px plus 2 px borders.
    assert grid.shape == (1, 3 * 20, 3 * 20, 3)
    assert grid.dtype == tf.float32
    assert 0 <= float(tf.reduce_min(grid)) and float(tf.reduce_max(grid)) <= 1


# --------------------------------------------------------------------------
# TFDS (mocked: nothing is downloaded).


def test_tfds_mock_cifar10_pipelines():
    data = config.DataConfig(
        dataset="cifar10", image_size=32, eval_split="test", seed=3
    )
    with tfds.testing.mock_data(num_examples=10):
        info = sources.open_source(data).info
        assert (info.num_train_examples, info.num_eval_examples) == (10, 10)
        assert info.num_classes == 10 and len(info.class_names) == 10
        train = _build(data, batch_size=4, is_training=True, pretrain=True)
        x, y = _batches(train, 1)[0]
        assert x.shape == (4, 32, 32, 6) and y.shape == (4, 10)
        np.testing.assert_array_equal(y.sum(1), 1.0)
        evals = _batches(
            _build(data, batch_size=4, is_training=False, pretrain=True)
        )
        assert [len(x) for x, _ in evals] == [4, 4, 2]
        assert all(x.shape[1:] == (32, 32, 3) for x, _ in evals)
        # Slicing syntax is passed to TFDS.
        _build(
            data,
            batch_size=4,
            is_training=False,
            pretrain=False,
            split="train[:50%]",
        )
        strategy = two_replica_strategy()
        dist = _build_distributed(
            strategy,
            data,
            global_batch_size=4,
            is_training=True,
            pretrain=False,
        )
        images, _ = next(iter(dist))
        shapes = [t.shape for t in strategy.experimental_local_results(images)]
        assert shapes == [(2, 32, 32, 3)] * 2


def test_tfds_unlabeled_examples_get_zero_labels():
    """STL-10's `unlabeled` split has label -1: an all-zero one-hot row."""
    png = tf.io.encode_png(tf.zeros([96, 96, 3], tf.uint8))

    def as_dataset(self, split, decoders=None, **kwargs):
        del self, split, decoders, kwargs
        return tf.data.Dataset.from_tensors(
            {"image": png, "label": tf.constant(-1, tf.int64)}
        ).repeat(5)

    data = config.DataConfig(
        dataset="stl10", train_split="unlabeled", image_size=SIZE, seed=1
    )
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        assert sources.open_source(data).info.num_classes == 10
        x, y = _batches(
            _build(data, batch_size=5, is_training=True, pretrain=True),
            1,
        )[0]
    assert x.shape == (5, SIZE, SIZE, 6)
    np.testing.assert_array_equal(y, np.zeros([5, 10]))


def test_tfds_reads_files_interleaved_like_the_reference():
    """cycle_length 32, block_length 1 (reference tf2/data.py) for the
    training and the eval split, so files mix before the shuffle."""
    png = tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8))
    calls = []

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        del self, decoders
        calls.append((split, kwargs.get("shuffle_files"), read_config))
        return tf.data.Dataset.from_tensors(
            {"image": png, "label": tf.constant(1, tf.int64)}
        ).repeat(4)

    data = config.DataConfig(
        dataset="cifar10", eval_split="test", image_size=SIZE, seed=1
    )
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        source = sources.open_source(data)
        calls.clear()  # Counting the examples reads without a ReadConfig.
        source.records("train", shuffle_files=True, shuffle_seed=5)
        source.records("test")
    assert [(split, shuffle) for split, shuffle, _ in calls] == [
        ("train", True),
        ("test", False),
    ]
    for _, _, read_config in calls:
        assert read_config.interleave_cycle_length == 32
        assert read_config.interleave_block_length == 1
    assert calls[0][2].shuffle_seed == 5


def test_unknown_tfds_name_is_one_clear_error():
    with pytest.raises(sources.DatasetError) as e:
        sources.open_source(config.DataConfig(dataset="cifar_ten"))
    message = str(e.value)
    assert "cifar_ten" in message and "folder:" in message
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert isinstance(e.value, config.ConfigError)


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(sources.DatasetError) as e:
        sources.open_source(
            config.DataConfig(dataset="cifar10", data_dir=data_dir)
        )
    assert f"tfds build cifar10 --data_dir={data_dir}" in str(e.value)
    with pytest.raises(sources.DatasetError) as e:
        sources.open_source(
            config.DataConfig(dataset="imagenet2012", data_dir=data_dir)
        )
    assert "downloads/manual" in str(e.value)
    assert "ILSVRC2012_img_train.tar" in str(e.value)


@pytest.mark.slow
def test_preview_script_writes_a_png(class_folder, tmp_path):
    output = tmp_path / "views.png"
    script = os.path.join(
        os.path.dirname(os.path.dirname(__file__)),
        "scripts",
        "preview_augmentations.py",
    )
    result = subprocess.run(
        [
            sys.executable,
            script,
            f"--dataset={config.FOLDER_PREFIX}{class_folder}",
            f"--output={output}",
            "--image_size=24",
            "--num_images=3",
            "--num_views=2",
            "--seed=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    sys.path.insert(0, os.path.dirname(script))
    import plot_run

    # The labelled grid of plot_run.plot_augmentations: 3 rows (images) of
    # an original and 2 views, at the script's figure size and resolution.
    width, height = plot_run.augmentation_figsize(3, 2)
    png = tf.io.decode_png(tf.io.read_file(str(output))).numpy()
    assert png.shape[:2] == (
        round(plot_run.DPI * height),
        round(plot_run.DPI * width),
    )
    # Not a blank canvas: the tiles hold images, not only the background.
    assert len(np.unique(png[..., :3].reshape(-1, 3), axis=0)) > 100


# --------------------------------------------------------------------------
# In-memory arrays.


def test_array_source_records_shards_and_eval_pipeline():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (7, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    source = sources.ArraySource(
        {"train": (images, labels), "test": (images[:3], labels[:3])},
        class_names=("a", "b", "c"),
        eval_split="test",
    )
    assert source.info == sources.DatasetInfo(7, 3, 3, ("a", "b", "c"))
    assert source.info.labelled
    # Pipeline 1 of 2 gets every second record, starting at the second.
    context = tf.distribute.InputContext(2, 1, 1)
    shard = list(source.records("train", input_context=context))
    assert [int(y) for _, y in shard] == labels[1::2].tolist()
    for (record, _), image in zip(shard, images[1::2], strict=True):
        np.testing.assert_array_equal(source.decode(record), image)
    # Eval at the images' own size (<= 32: no crop, no resize) is the
    # images scaled to [0, 1], in order, with one-hot labels.
    data = config.DataConfig(dataset="unused", image_size=SIZE, seed=0)
    ((x, y),) = _batches(
        ip.build_dataset(
            source, data, batch_size=8, is_training=False, split="train"
        )
    )
    np.testing.assert_allclose(x, images / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y, np.eye(3)[labels])
    with pytest.raises(sources.DatasetError, match="'val'.*'test', 'train'"):
        source.records("val")


def test_unlabelled_array_source_pretrains_with_num_views():
    images = (
        np.zeros((5, 20, 24, 3), np.uint8) + np.arange(5)[:, None, None, None]
    )
    source = sources.ArraySource({"train": (images, None)})
    assert source.info.num_classes is None and not source.info.labelled
    assert [int(y) for _, y in source.records("train")] == [-1] * 5
    data = config.DataConfig(dataset="unused", image_size=SIZE, seed=2)
    for views in (1, 2, 3):
        x, y = _batches(
            ip.build_dataset(
                source,
                data,
                batch_size=4,
                is_training=True,
                pretrain=True,
                num_views=views,
            ),
            1,
        )[0]
        assert x.shape == (4, SIZE, SIZE, 3 * views) and y.shape == (4, 0)
    with pytest.raises(sources.DatasetError, match="no labels"):
        ip.build_dataset(
            source, data, batch_size=4, is_training=True, pretrain=False
        )
