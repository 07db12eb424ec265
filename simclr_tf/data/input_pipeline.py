"""tf.data input pipelines for TFDS datasets and image folders (SPEC.md §2).

Sources (`DataConfig.dataset`):

* A TFDS name (`cifar10`, `imagenet2012`, `imagenet2012_subset/1pct`,
  `stl10`, ...) read from `data_dir`; splits by name, slicing included
  (`train[:10%]`, `train+unlabeled`). A label of -1 (STL-10 `unlabeled`)
  gives an all-zero one-hot row.
* `folder:/path`, an image folder (JPEG, PNG, BMP, GIF; any size; grayscale
  and RGBA become RGB):

  - split subfolders, used when `/path/<train_split>/` exists: each
    subfolder of `/path` is a split named after it (`train/`, `val/`, ...);
  - otherwise `/path` itself is the `train_split`, and `holdout_fraction` of
    it (per class, chosen deterministically) is held out as `eval_split`.

  Inside a split, class subfolders (any depth below them) give labelled
  data, labels = indices of the sorted class names of the train split; a
  split with images and no class subfolders is unlabeled (pretraining only).
  Unreadable files are skipped and reported once.

Elements are `(images, labels)`: images float32 in [0, 1], (b, H, W, 6) for
pretraining (two views on channels) and (b, H, W, 3) otherwise; labels
one-hot float32 (b, num_classes). Unlabeled data has `num_classes=None` and
labels of shape (b, 0): a one-hot over zero classes, so that code which
needs labels fails loudly instead of training on made-up ones.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from simclr_tf import config as config_lib
from simclr_tf.data import augment, folders
from simclr_tf.data.folders import NO_LABEL, DatasetError

# Shuffle buffer = per-replica batch x this (reference `data.py`).
SHUFFLE_MULTIPLIER_SMALL = 50  # image_size <= 32
SHUFFLE_MULTIPLIER = 10
AUTOTUNE = tf.data.AUTOTUNE

# The trainer logs this grid as an image summary.
augmentation_grid = augment.augmentation_grid


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the run needs to know about the data.

    Attributes:
      num_train_examples: readable examples in `train_split`.
      num_eval_examples: readable examples in `eval_split` (0 if absent).
      num_classes: number of classes; None for unlabeled data.
      class_names: class names in label order, when known.
      num_skipped_files: unreadable image files left out (folders only).
    """

    num_train_examples: int
    num_eval_examples: int
    num_classes: int | None
    class_names: tuple[str, ...] | None = None
    num_skipped_files: int = 0


# --------------------------------------------------------------------------
# TFDS.


def _tfds_builder(data: config_lib.DataConfig):
    try:
        return tfds.builder(data.dataset, data_dir=data.data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
        reason = str(e).splitlines()[0]
        raise DatasetError(
            f"Received: dataset={data.dataset!r}, which is not a TFDS "
            f"dataset ({reason}). Use a TFDS name such as cifar10, "
            "imagenet2012 or imagenet2012_subset/1pct (see "
            "tfds.list_builders()), or "
            f"--dataset={config_lib.FOLDER_PREFIX}/path/to/images."
        ) from None


def _not_prepared_message(data, builder) -> str:
    data_dir = data.data_dir or tfds.core.constants.DATA_DIR
    name = data.dataset
    message = (
        f"TFDS dataset {name!r} is not prepared in data_dir={data_dir}. "
        f"Prepare it once with `tfds build {name} --data_dir={data_dir}` "
        f"(or tfds.builder({name!r}, data_dir={data_dir!r})"
        ".download_and_prepare()), or pass --data_dir where it is."
    )
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if manual:
        manual = " ".join(manual.split())
        message += (
            " It needs files you download yourself, put in "
            f"{os.path.join(data_dir, 'downloads', 'manual')} first: "
            f"{manual}"
        )
    return message


def _tfds_keys(builder) -> tuple[str, str | None]:
    """(image key, label key or None) of the builder's features."""
    keys = builder.info.supervised_keys
    image_key, label_key = (
        keys if keys and len(keys) == 2 else ("image", "label")
    )
    features = builder.info.features
    names = set(features.keys())
    if image_key not in names or not isinstance(
        features[image_key], tfds.features.Image
    ):
        raise DatasetError(
            f"Received: dataset={builder.name!r}, which has no image feature "
            f"{image_key!r} (features: {sorted(names)}). Use an image "
            "classification dataset."
        )
    if not (
        isinstance(label_key, str)
        and label_key in names
        and isinstance(features[label_key], tfds.features.ClassLabel)
    ):
        label_key = None
    return image_key, label_key


def _tfds_read(data, builder, split, read_config=None, shuffle=False):
    """`builder.as_dataset` with clear errors; images stay encoded."""
    image_key, _ = _tfds_keys(builder)
    try:
        return builder.as_dataset(
            split=split,
            decoders={image_key: tfds.decode.SkipDecoding()},
            shuffle_files=shuffle,
            read_config=read_config,
        )
    except AssertionError:  # TFDS's "could not find data" check.
        raise DatasetError(_not_prepared_message(data, builder)) from None
    except (ValueError, KeyError) as e:
        raise DatasetError(
            f"Received: split={split!r}, which dataset {data.dataset!r} "
            f"cannot read ({str(e).splitlines()[0]}). Known splits: "
            f"{sorted(builder.info.splits)}."
        ) from None


def _tfds_num_shards(builder, split: str) -> int:
    try:
        return len(builder.info.splits[split].file_instructions)
    except (KeyError, ValueError, TypeError):
        return 0  # Unknown (e.g. under tfds.testing.mock_data).


def _tfds_num_examples(data, builder, split: str) -> int:
    ds = _tfds_read(data, builder, split)
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
        count = int(ds.cardinality())  # tfds.testing.mock_data has no splits.
        if count < 0:
            raise DatasetError(
                f"Cannot count the examples of split {split!r} of "
                f"{data.dataset!r}; re-prepare it with `tfds build`."
            ) from None
        return count


# --------------------------------------------------------------------------
# Dataset info.


def _eval_count(count_fn, data) -> int:
    try:
        return count_fn(data.eval_split)
    except DatasetError as e:
        logging.warning("No eval split: %s", e)
        return 0


def get_dataset_info(data: config_lib.DataConfig) -> DatasetInfo:
    """Sizes and classes of the configured dataset.

    A missing eval split is not an error here (pretraining does not need
    one): it gives `num_eval_examples=0` and a warning, and
    `build_dataset` raises if asked for it.

    Args:
      data: the data config.

    Returns:
      The dataset's `DatasetInfo`.

    Raises:
      DatasetError: unknown or unprepared TFDS dataset, bad train split,
        missing or empty folder.
    """
    if folders.is_folder(data):
        folder = folders.scan(data)

        def count(split):
            return len(folders.split_examples(folder, split, data)[0])

        classes = folder.class_names
        return DatasetInfo(
            num_train_examples=count(data.train_split),
            num_eval_examples=_eval_count(count, data),
            num_classes=len(classes) if classes else None,
            class_names=classes,
            num_skipped_files=folder.num_skipped,
        )
    builder = _tfds_builder(data)
    _, label_key = _tfds_keys(builder)
    label = builder.info.features[label_key] if label_key else None
    return DatasetInfo(
        num_train_examples=_tfds_num_examples(data, builder, data.train_split),
        num_eval_examples=_eval_count(
            functools.partial(_tfds_num_examples, data, builder), data
        ),
        num_classes=label.num_classes if label else None,
        class_names=tuple(label.names) if label else None,
    )


# --------------------------------------------------------------------------
# Pipelines.


def _seed_sequence(
    data: config_lib.DataConfig, pipeline_id: int
) -> np.random.SeedSequence:
    if data.seed is None:
        return np.random.SeedSequence()  # Fresh OS entropy.
    return np.random.SeedSequence([data.seed, pipeline_id])


def _encoded_source(data, split, input_context, shuffle_files, shuffle_seed):
    """(encoded image or file path, int64 label) records of one split,
    sharded per input pipeline; also returns the record -> uint8 loader."""
    n = input_context.num_input_pipelines if input_context else 1
    pid = input_context.input_pipeline_id if input_context else 0
    if folders.is_folder(data):
        paths, labels = folders.split_examples(folders.scan(data), split, data)
        ds = tf.data.Dataset.from_tensor_slices(
            (list(paths), np.asarray(labels, np.int64))
        )
        return ds.shard(n, pid), lambda p: folders.decode(tf.io.read_file(p))
    builder = _tfds_builder(data)
    image_key, label_key = _tfds_keys(builder)
    # Shard by file when every pipeline gets files, else by example.
    by_file = n > 1 and _tfds_num_shards(builder, split) >= n
    read_config = tfds.ReadConfig(
        input_context=input_context if by_file else None,
        shuffle_seed=int(shuffle_seed),
    )
    ds = _tfds_read(data, builder, split, read_config, shuffle_files)
    if n > 1 and not by_file:
        ds = ds.shard(n, pid)

    def record(example):
        label = example[label_key] if label_key else tf.constant(NO_LABEL)
        return example[image_key], tf.cast(label, tf.int64)

    return ds.map(record, num_parallel_calls=AUTOTUNE), folders.decode


def build_source(
    data: config_lib.DataConfig,
    split: str,
    *,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """Decoded images of one split, unshuffled: (uint8 (H, W, 3), label).

    Labels are int64 class indices, NO_LABEL (-1) when unlabeled. For tools
    such as the augmentation preview.
    """
    ds, load = _encoded_source(data, split, input_context, False, 0)
    return ds.map(lambda x, y: (load(x), y), num_parallel_calls=AUTOTUNE)


def _num_classes(data: config_lib.DataConfig) -> int | None:
    if folders.is_folder(data):
        classes = folders.scan(data).class_names
        return len(classes) if classes else None
    builder = _tfds_builder(data)
    _, label_key = _tfds_keys(builder)
    return builder.info.features[label_key].num_classes if label_key else None


def train_view_kwargs(data: config_lib.DataConfig, pretrain: bool) -> dict:
    """`augment.preprocess_for_train` arguments: colour and blur for
    pretraining only (SPEC.md §2)."""
    return dict(
        color_jitter_strength=data.color_jitter_strength if pretrain else 0.0,
        color_jitter_impl=data.color_jitter_impl,
        use_blur=data.use_blur and pretrain,
        min_crop_area=data.min_crop_area,
        use_flip=data.use_flip,
    )


@functools.lru_cache(maxsize=16)
def _train_view_fn(size: int, kwargs: tuple) -> tf.types.experimental.Function:
    """One training view, (uint8 image, seed) -> (size, size, 3) float32,
    as a tf.function traced once and shared by both views and by every
    pipeline of the process: the jitter graph is large (4 x 4 branches), so
    this makes building a pipeline several times faster."""

    def view(image, seed):
        return augment.preprocess_for_train(
            image, height=size, width=size, seed=seed, **dict(kwargs)
        )

    return tf.function(
        view,
        input_signature=[
            tf.TensorSpec([None, None, 3], tf.uint8),
            tf.TensorSpec([2], tf.int64),
        ],
        autograph=False,
    )


def _preprocess_fn(data, is_training, pretrain, num_classes, base_seed):
    size = data.image_size
    view = _train_view_fn(
        size, tuple(sorted(train_view_kwargs(data, pretrain).items()))
    )
    depth = num_classes or 0

    @tf.autograph.experimental.do_not_convert
    def preprocess(index, image, label):
        if is_training:
            # One stateless seed per element: the run seed folded with the
            # element's position in the (shuffled, repeated) stream.
            seed = tf.random.experimental.stateless_fold_in(base_seed, index)
            if pretrain:  # As augment.pretrain_views: 2 views on channels.
                views = [view(image, s) for s in augment.split_seed(seed, 2)]
                image = tf.concat(views, axis=-1)
            else:
                image = view(image, seed)
        else:
            image = augment.preprocess_for_eval(image, height=size, width=size)
        return image, tf.one_hot(label, depth, dtype=tf.float32)

    return preprocess


def build_dataset(
    data: config_lib.DataConfig,
    *,
    batch_size: int,
    is_training: bool,
    pretrain: bool,
    split: str | None = None,
    input_context: tf.distribute.InputContext | None = None,
    start_batch: int = 0,
) -> tf.data.Dataset:
    """The batched `(images, one_hot_labels)` pipeline of one input pipeline.

    Training: shuffle (buffer `batch_size` x 50 when image_size <= 32, else
    x 10), repeat, augment (two views when `pretrain`), batch with
    drop_remainder. Eval: eval preprocessing, one pass, last batch partial.
    `cache_dataset` caches the decoded images before augmentation. With
    `data.seed` set, two builds give identical batches.

    Args:
      data: the data config.
      batch_size: batch size of this pipeline (per replica when
        distributed).
      is_training: training augmentation, shuffle and repeat.
      pretrain: two colour-distorted views per image when training.
      split: split name; defaults to train_split / eval_split.
      input_context: the `tf.distribute.InputContext` to shard by.
      start_batch: training only: skip this many batches of the stream,
        before decoding, so that a resumed run with a fixed seed sees the
        same batches as an uninterrupted one.

    Returns:
      A `tf.data.Dataset` of (images, labels); see the module docstring.

    Raises:
      DatasetError: the data cannot be read, or fine-tuning on unlabeled
        data.
    """
    split = split or (data.train_split if is_training else data.eval_split)
    num_classes = _num_classes(data)
    if is_training and not pretrain and num_classes is None:
        raise DatasetError(
            f"Received: train_mode=finetune on {data.dataset!r}, which has "
            "no labels. Use class subfolders (or a labelled TFDS dataset), "
            "or --train_mode=pretrain."
        )
    pid = input_context.input_pipeline_id if input_context else 0
    seeds = _seed_sequence(data, pid).generate_state(3)
    ds, load = _encoded_source(
        data, split, input_context, is_training, seeds[0]
    )
    if data.cache_dataset:
        ds = ds.map(lambda x, y: (load(x), y), num_parallel_calls=AUTOTUNE)
        ds = ds.cache()
        load = tf.identity
    if is_training:
        multiplier = (
            SHUFFLE_MULTIPLIER_SMALL
            if data.image_size <= 32
            else SHUFFLE_MULTIPLIER
        )
        ds = ds.shuffle(batch_size * multiplier, seed=int(seeds[1]))
        ds = ds.repeat()
    base_seed = tf.constant([seeds[2], pid], tf.int64)
    preprocess = _preprocess_fn(
        data, is_training, pretrain, num_classes, base_seed
    )
    ds = ds.enumerate()
    if is_training and start_batch:
        ds = ds.skip(start_batch * batch_size)
    ds = ds.map(
        tf.autograph.experimental.do_not_convert(
            lambda i, record: preprocess(i, load(record[0]), record[1])
        ),
        num_parallel_calls=AUTOTUNE,
    )
    ds = ds.batch(batch_size, drop_remainder=is_training)
    return ds.prefetch(AUTOTUNE)


def build_distributed_dataset(
    strategy: tf.distribute.Strategy,
    data: config_lib.DataConfig,
    *,
    global_batch_size: int,
    is_training: bool,
    pretrain: bool,
    split: str | None = None,
    start_batch: int = 0,
) -> tf.distribute.DistributedDataset:
    """`build_dataset` per input pipeline, through
    `strategy.distribute_datasets_from_function`.

    Each replica gets `global_batch_size / num_replicas_in_sync` examples
    per step.

    Args:
      strategy: the distribution strategy.
      data: the data config.
      global_batch_size: examples per step over all replicas.
      is_training: as `build_dataset`.
      pretrain: as `build_dataset`.
      split: as `build_dataset`.
      start_batch: training only: global steps already taken; each input
        pipeline skips the per-replica batches those steps consumed
        (num_replicas_in_sync / num_input_pipelines per step).

    Returns:
      The `tf.distribute.DistributedDataset` of (images, labels).

    Raises:
      DatasetError: as `build_dataset`.
    """
    # Fail here, with our message, rather than inside the dataset function.
    _num_classes(data)

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        return build_dataset(
            data,
            batch_size=ctx.get_per_replica_batch_size(global_batch_size),
            is_training=is_training,
            pretrain=pretrain,
            split=split,
            input_context=ctx,
            start_batch=start_batch
            * ctx.num_replicas_in_sync
            // ctx.num_input_pipelines,
        )

    return strategy.distribute_datasets_from_function(dataset_fn)


# Records (paths, or encoded images for TFDS) the preview samples from.
PREVIEW_POOL = 2048


def preview_images(
    data: config_lib.DataConfig,
    *,
    split: str | None = None,
    num_images: int = 8,
    num_views: int = 4,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Originals and pretraining views of images sampled from a split.

    The images are drawn (with a fixed seed) from the first
    `PREVIEW_POOL` records of the split, before decoding, so that a folder
    sorted by class shows several classes. Each original is padded to a
    square (no crop); its `num_views` views are independent training views
    with the pretraining augmentation of `data`.

    Args:
      data: the data config (source, image_size, augmentation options).
      split: split name; defaults to `data.train_split`.
      num_images: images drawn.
      num_views: augmented views per image.

    Returns:
      originals (n, S, S, 3) and views (n, S, S, 3 * num_views), float32
      in [0, 1], S = `data.image_size`.

    Raises:
      DatasetError: the split has no images.
    """
    size = data.image_size
    kwargs = train_view_kwargs(data, pretrain=True)
    base = _seed_sequence(data, 0).generate_state(2).astype(np.int64)
    originals, views = [], []
    records, load = _encoded_source(
        data, split or data.train_split, None, False, 0
    )
    source = records.shuffle(PREVIEW_POOL, seed=0).take(num_images)
    for i, (record, _) in enumerate(source):
        image = augment.to_float(load(record))
        originals.append(tf.image.resize_with_pad(image, size, size))
        seed = tf.random.experimental.stateless_fold_in(base, i)
        views.append(
            augment.pretrain_views(
                image,
                height=size,
                width=size,
                seed=seed,
                num_views=num_views,
                **kwargs,
            )
        )
    if not views:
        raise DatasetError(
            f"Split {split or data.train_split!r} of {data.dataset!r} has no "
            "images to preview."
        )
    return tf.clip_by_value(tf.stack(originals), 0.0, 1.0), tf.stack(views)


def preview_grid(
    data: config_lib.DataConfig,
    *,
    split: str | None = None,
    num_images: int = 8,
    num_views: int = 4,
) -> tf.Tensor:
    """`preview_images` tiled into one image (TensorBoard, raw PNG).

    Row i: image i padded to a square, then its `num_views` views.

    Args:
      data: the data config (source, image_size, augmentation options).
      split: split name; defaults to `data.train_split`.
      num_images: rows of the grid.
      num_views: augmented views per image.

    Returns:
      (1, H, W, 3) float32 in [0, 1] (see `augment.augmentation_grid`).
    """
    originals, views = preview_images(
        data, split=split, num_images=num_images, num_views=num_views
    )
    return augmentation_grid(views, originals)
