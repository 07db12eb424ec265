"""Image folders as a data source: `--dataset=folder:/path` (SPEC.md §2).

Images: JPEG, PNG, BMP, GIF (first frame); any size; grayscale and RGBA
become RGB. Layout:

* split subfolders, used when `/path/<train_split>/` exists: each
  subfolder of `/path` is a split named after it (`train/`, `val/`, ...);
* otherwise `/path` itself is the `train_split`, and `holdout_fraction` of
  it (per class, chosen deterministically) is held out as `eval_split`.

Inside a split, class subfolders (any depth below them) give labelled
data, labels = indices of the sorted class names of the train split; a
split with images and no class subfolders is unlabeled (pretraining only).

`FolderSource` scans the folder once, when it is opened: lists, labels and
splits the files, decodes each once to drop unreadable ones (reported in
one warning), warns about classes missing from the eval split, and logs
one summary line (`describe`): classes, images per split, files skipped.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib
from simclr_tf.data import sources
from simclr_tf.data.sources import NO_LABEL, DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Held-out examples are chosen with this fixed seed, independent of --seed,
# so that every run of one folder evaluates on the same images.
HOLDOUT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Folder:
    """A scanned image folder: readable files per split."""

    root: str
    has_split_dirs: bool
    class_names: tuple[str, ...] | None
    # split name -> (paths, labels); labels are NO_LABEL when unlabeled.
    splits: dict[str, tuple[tuple[str, ...], tuple[int, ...]]]
    num_skipped: int


def _is_image(name: str) -> bool:
    # Hidden files are skipped: e.g. macOS "._x.jpg" resource forks.
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _subdirs(path: str) -> list[str]:
    names = (n.rstrip("/") for n in tf.io.gfile.listdir(path))
    return sorted(
        n
        for n in names
        if not n.startswith(".") and tf.io.gfile.isdir(os.path.join(path, n))
    )


def _images_in(path: str, recursive: bool) -> list[str]:
    if not recursive:
        names = tf.io.gfile.listdir(path)
        return sorted(os.path.join(path, n) for n in names if _is_image(n))
    found = []
    for dirpath, _, files in tf.io.gfile.walk(path):
        found += [os.path.join(dirpath, f) for f in files if _is_image(f)]
    return sorted(found)


def _read_split_dir(
    path: str, class_names: tuple[str, ...] | None
) -> tuple[list[str], list[int], tuple[str, ...] | None]:
    """Lists one split directory: class subfolders, or flat images.

    Args:
      path: the split directory.
      class_names: the train split's classes to map folder names onto, or
        None to take them from this directory.

    Returns:
      (paths, labels, class_names); class_names None when unlabeled.

    Raises:
      DatasetError: a class folder that the train split does not have.
    """
    classes = {
        c: _images_in(os.path.join(path, c), True) for c in _subdirs(path)
    }
    classes = {c: files for c, files in classes.items() if files}
    loose = _images_in(path, recursive=False)
    if not classes:
        return loose, [NO_LABEL] * len(loose), None
    if loose:
        logging.warning(
            "Ignoring %d image(s) directly in %s: with class subfolders "
            "present, images must be inside one (e.g. %s).",
            len(loose),
            path,
            loose[0],
        )
    names = tuple(classes) if class_names is None else class_names
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise DatasetError(
            f"Class folder(s) {unknown} in {path} are not classes of the "
            f"train split ({len(names)} classes: {list(names)[:10]}...). Use "
            "the same class folder names in every split."
        )
    paths, labels = [], []
    for label, name in enumerate(names):
        files = classes.get(name, [])
        paths += files
        labels += [label] * len(files)
    return paths, labels, names


def _holdout(
    paths: list[str], labels: list[int], fraction: float
) -> tuple[list[int], list[int]]:
    """Deterministic per-class split of indices into (kept, held out)."""
    rng = np.random.default_rng(HOLDOUT_SEED)
    kept, held = [], []
    labels_np = np.asarray(labels)
    for label in np.unique(labels_np):
        idx = np.flatnonzero(labels_np == label)
        idx = idx[rng.permutation(len(idx))]
        n_held = int(round(fraction * len(idx)))
        held += idx[:n_held].tolist()
        kept += idx[n_held:].tolist()
    return sorted(kept), sorted(held)


def _readable(paths: list[str]) -> np.ndarray:
    """A boolean mask of the files that read and decode without error."""
    ok = np.zeros(len(paths), bool)
    if not paths:
        return ok
    if len(paths) > 10000:
        logging.info("Checking that %d image files decode.", len(paths))

    def check(i, path):
        return i, tf.shape(sources.decode_image(tf.io.read_file(path)))

    ds = tf.data.Dataset.from_tensor_slices(paths).enumerate()
    ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    for index, _ in ds.batch(4096).as_numpy_iterator():
        ok[index] = True
    return ok


def scan_folder(
    root: str, train_split: str, eval_split: str, holdout_fraction: float
) -> Folder:
    """Lists, labels, splits and checks an image folder.

    Raises:
      DatasetError: not a directory, no images, or inconsistent classes.
    """
    shown = f"{config_lib.FOLDER_PREFIX}{root}"
    if not tf.io.gfile.isdir(root):
        raise DatasetError(
            f"Received: dataset={shown!r}, but {root} is not a directory. "
            "Give an existing folder of images."
        )
    raw = {}  # split -> (paths, labels)
    split_dirs = tf.io.gfile.isdir(os.path.join(root, train_split))
    if split_dirs:
        paths, labels, classes = _read_split_dir(
            os.path.join(root, train_split), None
        )
        raw[train_split] = (paths, labels)
        for name in _subdirs(root):
            if name != train_split:
                p, lab, _ = _read_split_dir(os.path.join(root, name), classes)
                if p:
                    raw[name] = (p, lab if classes else [NO_LABEL] * len(p))
    else:
        paths, labels, classes = _read_split_dir(root, None)
        kept, held = _holdout(paths, labels, holdout_fraction)
        raw[train_split] = ([paths[i] for i in kept], [labels[i] for i in kept])
        if held:
            raw[eval_split] = (
                [paths[i] for i in held],
                [labels[i] for i in held],
            )
    if not raw[train_split][0]:
        raise DatasetError(
            f"Received: dataset={shown!r}, but no images "
            f"({', '.join(IMAGE_EXTENSIONS)}) were found in "
            f"{os.path.join(root, train_split) if split_dirs else root}. "
            "Put images there, in one subfolder per class for labels."
        )
    return _check_folder(root, split_dirs, classes, raw, eval_split)


def _check_folder(root, split_dirs, classes, raw, eval_split) -> Folder:
    """Drops unreadable files (one warning) and reports missing classes."""
    all_paths = [p for paths, _ in raw.values() for p in paths]
    ok = dict(zip(all_paths, _readable(all_paths), strict=True))
    bad = [p for p in all_paths if not ok[p]]
    if bad:
        logging.warning(
            "Skipped %d unreadable image file(s) of %d in %s (corrupt, "
            "truncated or not an image), e.g. %s.",
            len(bad),
            len(all_paths),
            root,
            ", ".join(bad[:3]),
        )
    splits = {}
    for name, (paths, labels) in raw.items():
        good = [(p, y) for p, y in zip(paths, labels, strict=True) if ok[p]]
        splits[name] = (tuple(p for p, _ in good), tuple(y for _, y in good))
    if classes and eval_split in splits:
        present = set(splits[eval_split][1])
        missing = [c for i, c in enumerate(classes) if i not in present]
        if missing:
            logging.warning(
                "The eval split %r of %s has no images of %d of %d classes "
                "(e.g. %s); their accuracy is not measured.",
                eval_split,
                root,
                len(missing),
                len(classes),
                ", ".join(missing[:5]),
            )
    return Folder(root, split_dirs, classes, splits, len(bad))


def describe(folder: Folder) -> str:
    """One line saying what a scan found: classes, images per split,
    skipped files (logged when a folder is opened)."""
    classes = folder.class_names
    if classes is None:
        kinds = "unlabelled (no class subfolders: pretraining only)"
    else:
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        kinds = f"{len(classes)} classes ({shown})"
    sizes = ", ".join(
        f"{name} {len(paths):,}" for name, (paths, _) in folder.splits.items()
    )
    layout = "split subfolders" if folder.has_split_dirs else "one folder"
    return (
        f"Image folder {folder.root}: {kinds}; images per split ({layout}): "
        f"{sizes}; files skipped (do not decode): {folder.num_skipped}."
    )


class FolderSource(sources.Source):
    """An image folder, scanned once when opened (see the module docstring).

    Args:
      data: the data config (`dataset` = `folder:/path`, the train and eval
        splits, `holdout_fraction`).

    Raises:
      DatasetError: not a directory, no images, or inconsistent classes.
    """

    def __init__(self, data: config_lib.DataConfig):
        self.name = data.dataset
        self._train_split = data.train_split
        self.folder = scan_folder(
            data.dataset[len(config_lib.FOLDER_PREFIX) :],
            data.train_split,
            data.eval_split,
            data.holdout_fraction,
        )
        logging.info("%s", describe(self.folder))
        classes = self.folder.class_names

        def count(split):
            return len(self.examples(split)[0])

        self.info = sources.DatasetInfo(
            num_train_examples=count(data.train_split),
            num_eval_examples=sources.eval_split_size(count, data.eval_split),
            num_classes=len(classes) if classes else None,
            class_names=classes,
            num_skipped_files=self.folder.num_skipped,
        )

    def examples(self, split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(paths, labels) of one split.

        Raises:
          DatasetError: the folder has no such split (the message says how
            to make one).
        """
        folder = self.folder
        if split not in folder.splits:
            if folder.has_split_dirs:
                hint = (
                    f"use one of {sorted(folder.splits)}, or add a {split}/ "
                    f"subfolder of images to {folder.root}"
                )
            else:
                hint = (
                    f"set --holdout_fraction (e.g. 0.1) to hold out part of "
                    f"{folder.root} as {split!r}, or use split subfolders "
                    f"({self._train_split}/, {split}/)"
                )
            raise DatasetError(
                f"Received: split={split!r}, which {self.name!r} does not "
                f"have: {hint}."
            )
        return folder.splits[split]

    def records(
        self, split, *, input_context=None, shuffle_files=False, shuffle_seed=0
    ):
        """(file path, int64 label) of one split; see `Source.records`."""
        del shuffle_files, shuffle_seed  # The file list is the order.
        paths, labels = self.examples(split)
        ds = tf.data.Dataset.from_tensor_slices(
            (list(paths), np.asarray(labels, np.int64))
        )
        if input_context is None:
            return ds
        return ds.shard(
            input_context.num_input_pipelines, input_context.input_pipeline_id
        )

    def decode(self, record):
        """A file path -> its (H, W, 3) uint8 image."""
        return sources.decode_image(tf.io.read_file(record))
