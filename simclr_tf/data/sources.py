"""Data sources: a dataset opened once (SPEC.md §2).

A `Source` is what the rest of a run knows about its data: `info` (sizes,
classes, labelled or not), the `records` of a split as a `tf.data.Dataset`
of `(record, int64 label)` sharded for one input pipeline, and `decode`,
which turns a record into a `(H, W, 3)` uint8 image. Records stay encoded
(bytes, file paths) until after shuffling and skipping, so that a resumed
run skips batches without decoding them. A label of `NO_LABEL` (-1) marks
an unlabelled example.

`open_source(data)` opens the source of a `DataConfig` once (the
experiment does, and passes it down):

* a TFDS name (`cifar10`, `imagenet2012`, `imagenet2012_subset/1pct`,
  `stl10`, ...) read from `data_dir` (`TfdsSource`): splits by name,
  slicing included (`train[:10%]`, `train+unlabeled`);
* `folder:/path`, an image folder (`folders.FolderSource`, whose module
  docstring gives the layout rules).

`ArraySource` holds images in memory (tests, the benchmark). A new kind of
source subclasses `Source` and gets a branch in `open_source`.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib

# The label of an unlabelled example (e.g. STL-10's `unlabeled` split).
NO_LABEL = -1


def _tfds():
    """`tensorflow_datasets`, imported when a TFDS source is opened: its
    import takes 0.2 s on a 2-core CPU, which runs on image folders or
    arrays do not need to spend."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds


class DatasetError(config_lib.ConfigError):
    """A dataset that cannot be read as configured (the message says why)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the run needs to know about the data.

    Attributes:
      num_train_examples: readable examples in the train split.
      num_eval_examples: readable examples in the eval split (0 if absent).
      num_classes: number of classes; None for unlabeled data.
      class_names: class names in label order, when known.
      num_skipped_files: unreadable image files left out (folders only).
    """

    num_train_examples: int
    num_eval_examples: int
    num_classes: int | None
    class_names: tuple[str, ...] | None = None
    num_skipped_files: int = 0

    @property
    def labelled(self) -> bool:
        """Whether examples have class labels (`num_classes` is known)."""
        return self.num_classes is not None

    def require_labels(self, dataset: str, received: str, fix: str) -> None:
        """Refuses unlabelled data for what needs labels.

        Args:
          dataset: the dataset's name, for the message.
          received: what needs the labels, e.g. "train_mode=finetune".
          fix: the message's last sentence: how to go on.

        Raises:
          DatasetError: "Received: <received> on <dataset>, which has no
            labels. <fix>", when `labelled` is False.
        """
        if not self.labelled:
            raise DatasetError(
                f"Received: {received} on {dataset!r}, which has no "
                f"labels. {fix}"
            )


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP/GIF bytes -> (H, W, 3) uint8 (GIF: 1st frame;
    grayscale and RGBA become RGB)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def eval_split_size(count: Callable[[str], int], split: str) -> int:
    """`count(split)`, or 0 (logged) when the split cannot be read:
    training needs no eval split, and asking for its records raises. A run
    that evaluates refuses at its start without one
    (`preflight.check_eval_data`), so this is no warning."""
    try:
        return count(split)
    except DatasetError as e:
        logging.info("No eval split (only evaluation needs one): %s", e)
        return 0


def _concat_batches(ds: tf.data.Dataset) -> np.ndarray:
    """A dataset of int64 scalars as one NumPy array (empty if none)."""
    batches = ds.batch(65536).as_numpy_iterator()
    return np.concatenate([np.zeros((0,), np.int64), *batches])


def pipeline_index(input_context) -> tuple[int, int]:
    """(number of input pipelines, this pipeline's index)."""
    if input_context is None:
        return 1, 0
    return input_context.num_input_pipelines, input_context.input_pipeline_id


class Source(abc.ABC):
    """A dataset opened once: its info, the records of a split, decoding.

    Attributes:
      name: the dataset as the user named it (`--dataset`), for messages.
      info: sizes and classes (`DatasetInfo`).
    """

    name: str
    info: DatasetInfo

    @abc.abstractmethod
    def records(
        self,
        split: str,
        *,
        input_context: tf.distribute.InputContext | None = None,
        shuffle_files: bool = False,
        shuffle_seed: int = 0,
    ) -> tf.data.Dataset:
        """The `(record, int64 label)` pairs of one split, in a fixed order.

        Args:
          split: the split's name.
          input_context: shard for this input pipeline (None: all records).
          shuffle_files: shuffle the order of the files read, if any.
          shuffle_seed: seed of that file shuffle.

        Raises:
          DatasetError: the source has no such split (the message says how
            to make one).
        """

    @abc.abstractmethod
    def decode(self, record: tf.Tensor) -> tf.Tensor:
        """One record -> its (H, W, 3) uint8 image (a traceable tf op)."""

    def labels(self, split: str) -> np.ndarray:
        """The int64 labels of `split`, in the order `records` reads it
        (NO_LABEL for unlabelled examples); records are not decoded."""
        ds = self.records(split).map(lambda record, label: label)
        return _concat_batches(ds)


class ArraySource(Source):
    """Images held in memory: `{split: (uint8 (N, H, W, 3), labels)}`.

    Args:
      splits: the images of each split, with int labels (None: unlabelled).
      class_names: class names in label order; None for unlabelled data.
      train_split: the split whose size is `info.num_train_examples`.
      eval_split: the split whose size is `info.num_eval_examples`.
      name: how messages name the source.
    """

    def __init__(
        self,
        splits: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
        *,
        class_names: Sequence[str] | None = None,
        train_split: str = "train",
        eval_split: str = "validation",
        name: str = "in-memory arrays",
    ):
        self.name = name
        self._splits = {}
        for split, (images, labels) in splits.items():
            images = np.asarray(images, np.uint8)
            if labels is None:
                labels = np.full(len(images), NO_LABEL)
            self._splits[split] = (images, np.asarray(labels, np.int64))
        if train_split not in self._splits:
            raise DatasetError(
                f"Received: train_split={train_split!r}, which {name} does "
                f"not have. Use one of {sorted(self._splits)}."
            )
        self.info = DatasetInfo(
            num_train_examples=len(self._splits[train_split][0]),
            num_eval_examples=(
                len(self._splits[eval_split][0])
                if eval_split in self._splits
                else 0
            ),
            num_classes=len(class_names) if class_names else None,
            class_names=tuple(class_names) if class_names else None,
        )

    def records(
        self, split, *, input_context=None, shuffle_files=False, shuffle_seed=0
    ):
        del shuffle_files, shuffle_seed  # No files.
        if split not in self._splits:
            raise DatasetError(
                f"Received: split={split!r}, which {self.name} does not "
                f"have. Use one of {sorted(self._splits)}."
            )
        n, pid = pipeline_index(input_context)
        ds = tf.data.Dataset.from_tensor_slices(self._splits[split])
        return ds.shard(n, pid)

    def decode(self, record):
        return tf.convert_to_tensor(record, tf.uint8)


# TFDS reads 32 files at once, one example from each in turn (the
# reference's ReadConfig), so that consecutive examples come from
# different files before the shuffle buffer (the TFDS default reads
# blocks of 16 consecutive examples from 16 files).
TFDS_INTERLEAVE_CYCLE_LENGTH = 32
TFDS_INTERLEAVE_BLOCK_LENGTH = 1


class TfdsSource(Source):
    """A TFDS dataset, its builder created once.

    Args:
      data: the data config (`dataset`, `data_dir`, train and eval splits).

    Raises:
      DatasetError: unknown or unprepared dataset, no image feature, or an
        unreadable train split.
    """

    def __init__(self, data: config_lib.DataConfig):
        tfds = _tfds()
        self.name = data.dataset
        self._data_dir = data.data_dir
        try:
            self._builder = tfds.builder(data.dataset, data_dir=data.data_dir)
        except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
            reason = str(e).splitlines()[0]
            raise DatasetError(
                f"Received: dataset={data.dataset!r}, which is not a TFDS "
                f"dataset ({reason}). Use a TFDS name such as cifar10, "
                "imagenet2012 or imagenet2012_subset/1pct (see "
                "tfds.list_builders()), or "
                f"--dataset={config_lib.FOLDER_PREFIX}/path/to/images."
            ) from None
        self._image_key, self._label_key = self._keys()
        features = self._builder.info.features
        label = features[self._label_key] if self._label_key else None
        self.info = DatasetInfo(
            num_train_examples=self._num_examples(data.train_split),
            num_eval_examples=eval_split_size(
                self._num_examples, data.eval_split
            ),
            num_classes=label.num_classes if label else None,
            class_names=tuple(label.names) if label else None,
        )

    def _keys(self) -> tuple[str, str | None]:
        """(image key, label key or None) of the builder's features."""
        tfds = _tfds()
        keys = self._builder.info.supervised_keys
        image_key, label_key = (
            keys if keys and len(keys) == 2 else ("image", "label")
        )
        features = self._builder.info.features
        names = set(features.keys())
        if image_key not in names or not isinstance(
            features[image_key], tfds.features.Image
        ):
            raise DatasetError(
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
        tfds = _tfds()
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
        tfds = _tfds()
        try:
            return self._builder.as_dataset(
                split=split,
                decoders={self._image_key: tfds.decode.SkipDecoding()},
                shuffle_files=shuffle,
                read_config=read_config,
            )
        except AssertionError:  # TFDS's "could not find data" check.
            raise DatasetError(self._not_prepared_message()) from None
        except (ValueError, KeyError) as e:
            raise DatasetError(
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
                raise DatasetError(
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
        tfds = _tfds()
        try:
            ds = self._builder.as_dataset(
                split=split,
                decoders=tfds.decode.PartialDecoding({self._label_key: True}),
                shuffle_files=False,
            )
        except AssertionError:  # TFDS's "could not find data" check.
            raise DatasetError(self._not_prepared_message()) from None
        ds = ds.map(lambda example: tf.cast(example[self._label_key], tf.int64))
        return _concat_batches(ds)

    def records(
        self, split, *, input_context=None, shuffle_files=False, shuffle_seed=0
    ):
        n, pid = pipeline_index(input_context)
        # Shard by file when every pipeline gets files, else by example.
        by_file = n > 1 and self._num_shards(split) >= n
        tfds = _tfds()
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
            label = example[label_key] if label_key else tf.constant(NO_LABEL)
            return example[image_key], tf.cast(label, tf.int64)

        return ds.map(record, num_parallel_calls=tf.data.AUTOTUNE)

    def decode(self, record):
        return decode_image(record)


def open_source(data: config_lib.DataConfig) -> Source:
    """Opens the source `data.dataset` names: reads its info once.

    A missing eval split is not an error here (training does not need
    one): it gives `num_eval_examples=0` (logged), and reading its records
    raises; a run that evaluates checks for it before it starts
    (`preflight`).

    Args:
      data: the data config.

    Returns:
      A `FolderSource` for `folder:/path`, else a `TfdsSource`; wrapped in
      `subsets.LabelFractionSource` when `data.label_fraction < 1`.

    Raises:
      DatasetError: unknown or unprepared TFDS dataset, bad train split,
        missing or empty folder.
    """
    # Imported here: `folders` builds on this module's Source.
    from simclr_tf.data import folders, subsets

    if data.dataset.startswith(config_lib.FOLDER_PREFIX):
        source = folders.FolderSource(data)
    else:
        source = TfdsSource(data)
    if data.label_fraction < 1.0:
        return subsets.LabelFractionSource(source, data)
    return source
