"""Tests of `--label_fraction`: the class-balanced subset a source's train
split becomes (`subsets.LabelFractionSource`), on folders, TFDS (mocked)
and in a fine-tuning run."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from simclr_tf import config as config_lib
from simclr_tf.data import sources, subsets

# Train images per class (unequal on purpose) and validation images.
TRAIN = {"ant": 10, "bee": 30, "cat": 5}
VAL = {"ant": 2, "bee": 2, "cat": 2}


def _write(root, counts):
    for name, n in counts.items():
        os.makedirs(os.path.join(root, name))
        for i in range(n):
            image = np.full((8, 8, 3), i, np.uint8)
            Image.fromarray(image).save(os.path.join(root, name, f"{i}.png"))


@pytest.fixture
def split_folder(tmp_path):
    root = str(tmp_path / "data")
    _write(os.path.join(root, "train"), TRAIN)
    _write(os.path.join(root, "val"), VAL)
    return root


def _data(root, **kw):
    values = dict(
        dataset=config_lib.FOLDER_PREFIX + root,
        eval_split="val",
        image_size=8,
        seed=3,
    )
    return config_lib.DataConfig(**(values | kw))


def _paths(source, split="train", input_context=None):
    records = source.records(split, input_context=input_context)
    return [path.decode() for path, _ in records.as_numpy_iterator()]


def _class_of(path):
    return os.path.basename(os.path.dirname(path))


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_folder_subset_is_class_balanced_with_hand_counts(
    split_folder, fraction, caplog
):
    caplog.set_level("INFO", logger="absl")
    source = sources.open_source(_data(split_folder, label_fraction=fraction))
    paths = _paths(source)
    kept = {c: sum(_class_of(p) == c for p in paths) for c in TRAIN}
    # Hand-computed: max(1, round(fraction * n_c)); Python's round is the
    # half-to-even rounding NumPy's round uses.
    want = {c: max(1, round(fraction * n)) for c, n in TRAIN.items()}
    assert kept == want
    assert len(set(paths)) == len(paths)
    assert source.info.num_train_examples == sum(want.values())
    # The labels travel with their files.
    names = source.info.class_names
    for path, label in source.records("train").as_numpy_iterator():
        assert names[label] == _class_of(path.decode())
    lo, hi = min(want.values()), max(want.values())
    assert (
        f"training on {sum(want.values())} of 45 images of split 'train'; "
        f"per class {lo}-{hi} kept of 5-30." in caplog.text
    )


def test_subset_is_deterministic_per_seed(split_folder):
    def draw(**kw):
        data = _data(split_folder, label_fraction=0.2, **kw)
        return _paths(sources.open_source(data))

    assert draw(seed=3) == draw(seed=3)
    assert draw(seed=3) != draw(seed=4)
    # An unset seed draws with seed 0 (documented), not at random.
    assert draw(seed=None) == draw(seed=0)


def test_subset_is_drawn_from_train_only_and_eval_is_whole(split_folder):
    source = sources.open_source(_data(split_folder, label_fraction=0.2))
    train = _paths(source)
    assert all("/train/" in p for p in train)
    val = _paths(source, "val")
    assert len(val) == sum(VAL.values())
    assert source.info.num_eval_examples == sum(VAL.values())
    assert not set(train) & set(val)


def test_subset_is_disjoint_from_a_folders_holdout(tmp_path):
    root = str(tmp_path / "flat")
    _write(root, TRAIN)
    data = _data(root, eval_split="held", holdout_fraction=0.2)
    whole = sources.open_source(data)
    held = set(_paths(whole, "held"))
    train = set(_paths(whole))
    subset = sources.open_source(
        config_lib.DataConfig(**(vars(data) | {"label_fraction": 0.3}))
    )
    picked = _paths(subset)
    assert set(picked) <= train
    assert not set(picked) & held
    assert set(_paths(subset, "held")) == held
    # Balanced over what holdout left in train, per class.
    for c in TRAIN:
        n_train = sum(_class_of(p) == c for p in train)
        got = sum(_class_of(p) == c for p in picked)
        assert got == max(1, round(0.3 * n_train))


def test_input_pipelines_share_the_subset(split_folder):
    source = sources.open_source(_data(split_folder, label_fraction=0.5))
    whole = _paths(source)
    shards = [
        _paths(source, input_context=tf.distribute.InputContext(2, i, 1))
        for i in range(2)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(whole)


def test_tfds_subset_reads_labels_only_and_matches_records():
    # Example i: an image of constant value i; classes of 20, 12 and 8.
    labels = np.random.default_rng(0).permutation(
        np.repeat(np.arange(3), [20, 12, 8])
    )
    images = [
        tf.io.encode_png(np.full((4, 4, 3), i, np.uint8))
        for i in range(labels.size)
    ]
    calls = []

    def as_dataset(self, split, decoders=None, **kwargs):
        del self, kwargs
        calls.append((split, decoders))
        return tf.data.Dataset.from_tensor_slices(
            {"image": tf.stack(images), "label": labels}
        )

    data = config_lib.DataConfig(
        dataset="cifar10", eval_split="test", label_fraction=0.25, seed=1
    )
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        source = sources.open_source(data)
        records = list(source.records("train").as_numpy_iterator())
        ids = [int(source.decode(r)[0, 0, 0]) for r, _ in records]
    want = subsets.class_balanced_subset(labels, 0.25, seed=1)
    assert ids == list(want)
    np.testing.assert_array_equal([y for _, y in records], labels[want])
    assert source.info.num_train_examples == want.size == 5 + 3 + 2
    # The label pass decodes the label feature only.
    label_pass = [
        d for _, d in calls if isinstance(d, tfds.decode.PartialDecoding)
    ]
    assert len(label_pass) == 1
    assert set(label_pass[0]._feature_specs) == {"label"}  # noqa: SLF001


def test_unlabelled_source_with_a_fraction_is_one_clear_error(tmp_path):
    root = str(tmp_path / "flat")
    os.makedirs(root)
    for i in range(4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f"{root}/{i}.png")
    with pytest.raises(sources.DatasetError, match="has no labels"):
        sources.open_source(_data(root, label_fraction=0.5))


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_fraction_outside_zero_one_is_a_config_error(fraction):
    with pytest.raises(config_lib.ConfigError, match="label_fraction"):
        config_lib.DataConfig(label_fraction=fraction)


@pytest.mark.parametrize("mode", ["pretrain"])
def test_fraction_outside_finetuning_is_a_config_error(mode):
    with pytest.raises(config_lib.ConfigError, match="train_mode=finetune"):
        config_lib.from_flat({"train_mode": mode, "label_fraction": 0.1})
    config_lib.from_flat({"train_mode": "finetune", "label_fraction": 0.1})


@pytest.mark.slow
def test_finetune_run_steps_by_the_subset(split_folder, tmp_path):
    from simclr_tf import experiment

    model_dir = str(tmp_path / "run")
    config = config_lib.from_flat(
        dict(
            dataset=config_lib.FOLDER_PREFIX + split_folder,
            eval_split="val",
            label_fraction=0.2,
            train_mode="finetune",
            mode="train_then_eval",
            resnet_depth=18,
            resnet_base_width=4,
            image_size=8,
            train_batch_size=2,
            eval_batch_size=6,
            train_epochs=1,
            warmup_epochs=1.0,
            optimizer="momentum",
            learning_rate=0.1,
            steps_per_loop=1,
            model_dir=model_dir,
            keep_hub_module_max=0,
            mixed_precision="none",
            seed=0,
        )
    )
    experiment.run(config)
    with open(os.path.join(model_dir, "run_info.json")) as f:
        info = json.load(f)
    subset = sum(max(1, round(0.2 * n)) for n in TRAIN.values())  # 9
    assert info["num_train_examples"] == subset
    # total_train_steps: n * epochs // batch + 1, with the subset's n.
    assert info["total_steps"] == subset * 1 // 2 + 1
    with open(os.path.join(model_dir, "result.json")) as f:
        result = json.load(f)
    assert result["global_step"] == subset // 2 + 1
    assert 0.0 <= result["eval/label_top_1_accuracy"] <= 1.0
