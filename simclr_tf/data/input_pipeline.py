"""tf.data input pipelines over an opened data source (SPEC.md §2).

A pipeline composes, for one input pipeline of a run: the records of a
split (`sources.Source.records`, sharded) -> [decode and cache] -> shuffle
and repeat (training) -> skip the batches a resumed run consumed ->
decode and augment -> batch -> prefetch. Training augments each image into
`num_views` views on the channel axis (the model's `num_views`: 2 for
pretraining); colour distortion and blur are for pretraining only.

Elements are `(images, labels)`: images float32 in [0, 1],
(b, H, W, 3 * num_views) when training and (b, H, W, 3) for eval; labels
one-hot float32 (b, num_classes), all zero for an unlabelled example.
Unlabeled data has `num_classes=None` and labels of shape (b, 0): a
one-hot over zero classes, so that code which needs labels fails loudly
instead of training on made-up ones.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf.data import augment
from simclr_tf.data.sources import DatasetError, Source

# Shuffle buffer = per-replica batch x this (reference `data.py`).
SHUFFLE_MULTIPLIER_SMALL = 50  # image_size <= 32
SHUFFLE_MULTIPLIER = 10
AUTOTUNE = tf.data.AUTOTUNE
# Records (paths, or encoded images for TFDS) the preview samples from.
PREVIEW_POOL = 2048


def _seed_sequence(
    data: config_lib.DataConfig, pipeline_id: int
) -> np.random.SeedSequence:
    if data.seed is None:
        return np.random.SeedSequence()  # Fresh OS entropy.
    return np.random.SeedSequence([data.seed, pipeline_id])


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
    as a tf.function traced once and shared by all views and by every
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


def _preprocess_fn(data, is_training, pretrain, num_views, depth, base_seed):
    """(index, uint8 image, label) -> (views or eval image, one-hot)."""
    size = data.image_size
    view = _train_view_fn(
        size, tuple(sorted(train_view_kwargs(data, pretrain).items()))
    )

    @tf.autograph.experimental.do_not_convert
    def preprocess(index, image, label):
        if is_training:
            # One stateless seed per element: the run seed folded with the
            # element's position in the (shuffled, repeated) stream.
            seed = tf.random.experimental.stateless_fold_in(base_seed, index)
            if num_views == 1:
                image = view(image, seed)
            else:
                image = augment.views_on_channels(view, image, seed, num_views)
        else:
            image = augment.preprocess_for_eval(image, height=size, width=size)
        return image, tf.one_hot(label, depth, dtype=tf.float32)

    return preprocess


def build_dataset(
    source: Source,
    data: config_lib.DataConfig,
    *,
    batch_size: int,
    is_training: bool,
    pretrain: bool = False,
    num_views: int = 1,
    split: str | None = None,
    input_context: tf.distribute.InputContext | None = None,
    start_batch: int = 0,
    need_labels: bool | None = None,
) -> tf.data.Dataset:
    """The batched `(images, one_hot_labels)` pipeline of one input pipeline.

    Training: shuffle (buffer `batch_size` x 50 when image_size <= 32, else
    x 10), repeat, augment into `num_views` views, batch with
    drop_remainder. Eval: eval preprocessing, one pass, last batch partial.
    `cache_dataset` caches the decoded images before augmentation. With
    `data.seed` set, two builds give identical batches.

    Args:
      source: the opened data source.
      data: the data config (splits, image size, augmentation, seed,
        caching).
      batch_size: batch size of this pipeline (per replica when
        distributed).
      is_training: training augmentation, shuffle and repeat.
      pretrain: training only: the pretraining augmentation (colour
        distortion and blur) instead of crop and flip only.
      num_views: training only: views per image, on the channel axis (the
        model's `num_views`).
      split: split name; defaults to train_split / eval_split.
      input_context: the `tf.distribute.InputContext` to shard by.
      start_batch: training only: skip this many batches of the stream,
        before decoding, so that a resumed run with a fixed seed sees the
        same batches as an uninterrupted one.
      need_labels: training only: refuse a source without labels (default:
        when not pretraining; distillation reads unlabelled data).

    Returns:
      A `tf.data.Dataset` of (images, labels); see the module docstring.

    Raises:
      DatasetError: the split cannot be read, or supervised training on
        unlabeled data.
    """
    split = split or (data.train_split if is_training else data.eval_split)
    if need_labels is None:
        need_labels = not pretrain
    if is_training and need_labels:
        source.info.require_labels(
            source.name,
            "a supervised training pipeline",
            "Use class subfolders (or a labelled TFDS dataset), or pretrain.",
        )
    pid = input_context.input_pipeline_id if input_context else 0
    seeds = _seed_sequence(data, pid).generate_state(3)
    ds = source.records(
        split,
        input_context=input_context,
        shuffle_files=is_training,
        shuffle_seed=seeds[0],
    )
    load = source.decode
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
        data,
        is_training,
        pretrain,
        num_views,
        source.info.num_classes or 0,
        base_seed,
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
    source: Source,
    data: config_lib.DataConfig,
    *,
    global_batch_size: int,
    is_training: bool,
    pretrain: bool = False,
    num_views: int = 1,
    split: str | None = None,
    start_batch: int = 0,
    need_labels: bool | None = None,
) -> tf.distribute.DistributedDataset:
    """`build_dataset` per input pipeline, through
    `strategy.distribute_datasets_from_function`.

    Each replica gets `global_batch_size / num_replicas_in_sync` examples
    per step.

    Args:
      strategy: the distribution strategy.
      source: the opened data source.
      data: the data config.
      global_batch_size: examples per step over all replicas.
      is_training: as `build_dataset`.
      pretrain: as `build_dataset`.
      num_views: as `build_dataset`.
      split: as `build_dataset`.
      start_batch: training only: global steps already taken; each input
        pipeline skips the per-replica batches those steps consumed
        (num_replicas_in_sync / num_input_pipelines per step).
      need_labels: as `build_dataset`.

    Returns:
      The `tf.distribute.DistributedDataset` of (images, labels).

    Raises:
      DatasetError: as `build_dataset`.
    """

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        return build_dataset(
            source,
            data,
            batch_size=ctx.get_per_replica_batch_size(global_batch_size),
            is_training=is_training,
            pretrain=pretrain,
            num_views=num_views,
            split=split,
            input_context=ctx,
            start_batch=start_batch
            * ctx.num_replicas_in_sync
            // ctx.num_input_pipelines,
            need_labels=need_labels,
        )

    return strategy.distribute_datasets_from_function(dataset_fn)


def preview_images(
    source: Source,
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
      source: the opened data source.
      data: the data config (image_size, augmentation options, seed).
      split: split name; defaults to `data.train_split`.
      num_images: images drawn.
      num_views: augmented views per image.

    Returns:
      originals (n, S, S, 3) and views (n, S, S, 3 * num_views), float32
      in [0, 1], S = `data.image_size`.

    Raises:
      DatasetError: the split cannot be read or has no images.
    """
    size = data.image_size
    kwargs = train_view_kwargs(data, pretrain=True)
    base = _seed_sequence(data, 0).generate_state(2).astype(np.int64)
    split = split or data.train_split
    originals, views = [], []
    records = source.records(split).shuffle(PREVIEW_POOL, seed=0)
    for i, (record, _) in enumerate(records.take(num_images)):
        image = augment.to_float(source.decode(record))
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
            f"Split {split!r} of {source.name!r} has no images to preview."
        )
    return tf.clip_by_value(tf.stack(originals), 0.0, 1.0), tf.stack(views)


def preview_grid(
    source: Source,
    data: config_lib.DataConfig,
    *,
    split: str | None = None,
    num_images: int = 8,
    num_views: int = 4,
) -> tf.Tensor:
    """`preview_images` tiled into one image (TensorBoard, raw PNG).

    Row i: image i padded to a square, then its `num_views` views.

    Args:
      source: the opened data source.
      data: the data config (image_size, augmentation options, seed).
      split: split name; defaults to `data.train_split`.
      num_images: rows of the grid.
      num_views: augmented views per image.

    Returns:
      (1, H, W, 3) float32 in [0, 1] (see `augment.augmentation_grid`).
    """
    originals, views = preview_images(
        source, data, split=split, num_images=num_images, num_views=num_views
    )
    return augment.augmentation_grid(views, originals)
