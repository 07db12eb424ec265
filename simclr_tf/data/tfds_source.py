"""A TFDS dataset as a `sources.Source` (SPEC.md §2).

`sources.open_source` imports this module only for a TFDS name, so that a
run on an image folder or on arrays does not import `tensorflow_datasets`
(0.2 s on a 2-core CPU).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf import config as config_lib
from simclr_tf.data import sources

# TFDS reads 32 files at once, one example from each in turn (the
# reference's ReadConfig), so that consecutive examples come from
# different files before the shuffle buffer (the TFDS default reads
# blocks of 16 consecutive examples from 16 files).
TFDS_INTERLEAVE_CYCLE_LENGTH = 32
TFDS_INTERLEAVE_BLOCK_LENGTH = 1


class TfdsSource(sources.Source):
    """A TFDS dataset, its builder created once.

    Args:
      data: the data config (`dataset`, `data_dir`, train and eval splits).

    Raises:
      sources.DatasetError: unknown or unprepared dataset, no image
        feature, or an unreadable train split.
    """

    def __init__(self, data: config_lib.DataConfig):
        self.name = data.dataset
        self._data_dir = data.data_dir
        try:
            self._builder = tfds.builder(data.dataset, data_dir=data.data_dir)
        except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
            reason = str(e).splitlines()[0]
            raise sources.DatasetError(
                f"Received: dataset={data.dataset!r}, which is not a TFDS "
                f"dataset ({reason}). Use a TFDS name such as cifar10, "
                "imagenet2012 or imagenet2012_subset/1pct (see "
                "tfds.list_builders()), or "
                f"--dataset={config_lib.FOLDER_PREFIX}/path/to/images."
            ) from None
        self._image_key, self._label_key = self._keys()
        features = self._builder.info.features
        label = features[self._label_key] if self._label_key else None
        self.info = sources.DatasetInfo(
            num_train_examples=self._num_examples(data.train_split),
            num_eval_examples=sources.eval_split_size(
                self._num_examples, data.eval_split
            ),
            num_classes=label.num_classes if label else None,
            class_names=tuple(label.names) if label else None,
        )

    def _keys(self) -> tuple[str, str | None]:
        """(image key, label key or None) of the builder's features."""
        keys = self._builder.info.supervised_keys
        image_key, label_key = (
            keys if keys and len(keys) == 2 else ("image", "label")
        )
        features = self._builder.info.features
        names = set(features.keys())
        if image_key not in names or not isinstance(
            features[image_key], tfds.features.Image
        ):
            raise sources.DatasetError(
                f"Received: dataset={self.name!r}, which has no image "
                f"feature {image_key!r} (features: {sorted(names)}). Use an "
                "image classification dataset."
            )
        if not (
            isinstance(label_key, str)
            and label_key in names
            and isinstance(features[label_key], tfds.features.ClassLabel)
        ):
            label_key = None
        return image_key, label_key

    def _not_prepared_message(self) -> str:
        data_dir = self._data_dir or tfds.core.constants.DATA_DIR
        name = self.name
        message = (
            f"TFDS dataset {name!r} is not prepared in data_dir={data_dir}. "
            f"Prepare it once with `tfds build {name} --data_dir={data_dir}` "
            f"(or tfds.builder({name!r}, data_dir={data_dir!r})"
            ".download_and_prepare()), or pass --data_dir where it is."
        )
        manual = getattr(self._builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
        if manual:
            manual = " ".join(manual.split())
            message += (
                " It needs files you download yourself, put in "
                f"{os.path.join(data_dir, 'downloads', 'manual')} first: "
                f"{manual}"
            )
        return message

    def _read(self, split, read_config=None, shuffle=False) -> tf.data.Dataset:
        """`builder.as_dataset` with clear errors; images stay encoded."""
        try:
            return self._builder.as_dataset(
                split=split,
                decoders={self._image_key: tfds.decode.SkipDecoding()},
                shuffle_files=shuffle,
                read_config=read_config,
            )
        except AssertionError:  # TFDS's "could not find data" check.
            raise sources.DatasetError(self._not_prepared_message()) from None
        except (ValueError, KeyError) as e:
            raise sources.DatasetError(
                f"Received: split={split!r}, which dataset {self.name!r} "
                f"cannot read ({str(e).splitlines()[0]}). Known splits: "
                f"{sorted(self._builder.info.splits)}."
            ) from None

    def _num_shards(self, split: str) -> int:
        try:
            return len(self._builder.info.splits[split].file_instructions)
        except (KeyError, ValueError, TypeError):
            return 0  # Unknown (e.g. under tfds.testing.mock_data).

    def _num_examples(self, split: str) -> int:
        ds = self._read(split)
        try:
            return int(self._builder.info.splits[split].num_examples)
        except (KeyError, ValueError, TypeError):
            count = int(ds.cardinality())  # mock_data has no split info.
            if count < 0:
                raise sources.DatasetError(
                    f"Cannot count the examples of split {split!r} of "
                    f"{self.name!r}; re-prepare it with `tfds build`."
                ) from None
            return count

    def labels(self, split: str) -> np.ndarray:
        """The int64 labels of `split` in `records` order.

        Only the label feature is decoded (`tfds.decode.PartialDecoding`),
        but every record of the split is still read from disk: one pass of
        I/O over the split (seconds for CIFAR-10; for ImageNet's 1.28 M
        images about as long as reading its ~140 GB once, which is why
        `imagenet2012_subset/1pct` and `/10pct` stay the ImageNet path).
        """
        try:
            ds = self._builder.as_dataset(
                split=split,
                decoders=tfds.decode.PartialDecoding({self._label_key: True}),
                shuffle_files=False,
            )
        except AssertionError:  # TFDS's "could not find data" check.
            raise sources.DatasetError(self._not_prepared_message()) from None
        ds = ds.map(lambda example: tf.cast(example[self._label_key], tf.int64))
        return sources.concat_batches(ds)

    def records(
        self, split, *, input_context=None, shuffle_files=False, shuffle_seed=0
    ):
        n, pid = sources.pipeline_index(input_context)
        # Shard by file when every pipeline gets files, else by example.
        by_file = n > 1 and self._num_shards(split) >= n
        read_config = tfds.ReadConfig(
            input_context=input_context if by_file else None,
            shuffle_seed=int(shuffle_seed),
            interleave_cycle_length=TFDS_INTERLEAVE_CYCLE_LENGTH,
            interleave_block_length=TFDS_INTERLEAVE_BLOCK_LENGTH,
        )
        ds = self._read(split, read_config, shuffle_files)
        if n > 1 and not by_file:
            ds = ds.shard(n, pid)
        image_key, label_key = self._image_key, self._label_key

        def record(example):
            label = (
                example[label_key]
                if label_key
                else tf.constant(sources.NO_LABEL)
            )
            return example[image_key], tf.cast(label, tf.int64)

        return ds.map(record, num_parallel_calls=tf.data.AUTOTUNE)

    def decode(self, record):
        return sources.decode_image(record)
