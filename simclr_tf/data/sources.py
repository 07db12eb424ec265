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
  `stl10`, ...) read from `data_dir` (`tfds_source.TfdsSource`): splits
  by name, slicing included (`train[:10%]`, `train+unlabeled`);
* `folder:/path`, an image folder (`folders.FolderSource`, whose module
  docstring gives the layout rules).

`ArraySource` holds images in memory (tests, the benchmark). A new kind of
source subclasses `Source` and gets a branch in `open_source`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib

# The label of an unlabelled example (e.g. STL-10's `unlabeled` split).
NO_LABEL = -1


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


def concat_batches(ds: tf.data.Dataset) -> np.ndarray:
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
        return concat_batches(ds)


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


def open_source(data: config_lib.DataConfig) -> Source:
    """Opens the source `data.dataset` names: reads its info once.

    A missing eval split is not an error here (training does not need
    one): it gives `num_eval_examples=0` (logged), and reading its records
    raises; a run that evaluates checks for it before it starts
    (`preflight`).

    Args:
      data: the data config.

    Returns:
      A `FolderSource` for `folder:/path`, else a `TfdsSource`
      (`tfds_source`); wrapped in
      `subsets.LabelFractionSource` when `data.label_fraction < 1`.

    Raises:
      DatasetError: unknown or unprepared TFDS dataset, bad train split,
        missing or empty folder.
    """
    # Imported here: `folders` and `tfds_source` build on this module's
    # Source, and `tfds_source` imports tensorflow_datasets (0.2 s on a
    # 2-core CPU), which runs on folders or arrays do without.
    from simclr_tf.data import folders, subsets

    if data.dataset.startswith(config_lib.FOLDER_PREFIX):
        source = folders.FolderSource(data)
    else:
        from simclr_tf.data import tfds_source

        source = tfds_source.TfdsSource(data)
    if data.label_fraction < 1.0:
        return subsets.LabelFractionSource(source, data)
    return source
