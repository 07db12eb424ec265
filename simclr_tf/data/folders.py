"""Image folders as datasets: `--dataset=folder:/path` (SPEC.md §2).

Scans a folder once per process (`scan`): split subfolders or a held-out
fraction, class subfolders as labels (or unlabeled images), unreadable
files dropped with one warning. `simclr_tf.data.input_pipeline` reads the
files a split lists (`split_examples`) and decodes them (`decode`).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Held-out examples are chosen with this fixed seed, independent of --seed,
# so that every run of one folder evaluates on the same images.
HOLDOUT_SEED = 0
# Unlabeled examples carry this label.
NO_LABEL = -1
AUTOTUNE = tf.data.AUTOTUNE


class DatasetError(config_lib.ConfigError):
    """A dataset that cannot be read as configured (the message says why)."""


def is_folder(data: config_lib.DataConfig) -> bool:
    """Whether `data.dataset` names an image folder (`folder:/path`)."""
    return data.dataset.startswith(config_lib.FOLDER_PREFIX)


def _folder_root(data: config_lib.DataConfig) -> str:
    return data.dataset[len(config_lib.FOLDER_PREFIX) :]


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


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP/GIF bytes -> (H, W, 3) uint8 (GIF: 1st frame)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _readable(paths: list[str]) -> np.ndarray:
    """A boolean mask of the files that read and decode without error."""
    ok = np.zeros(len(paths), bool)
    if not paths:
        return ok
    if len(paths) > 10000:
        logging.info("Checking that %d image files decode.", len(paths))

    def check(i, path):
        return i, tf.shape(decode(tf.io.read_file(path)))

    ds = tf.data.Dataset.from_tensor_slices(paths).enumerate()
    ds = ds.map(check, num_parallel_calls=AUTOTUNE).ignore_errors()
    for index, _ in ds.batch(4096).as_numpy_iterator():
        ok[index] = True
    return ok


@functools.lru_cache(maxsize=8)
def _scan_folder(
    root: str, train_split: str, eval_split: str, holdout_fraction: float
) -> Folder:
    """Lists, labels, splits and checks an image folder (once per process).

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


def scan(data: config_lib.DataConfig) -> Folder:
    """The scanned folder of `data` (cached per process; see the module
    docstring of `input_pipeline` for the layout rules).

    Raises:
      DatasetError: not a directory, no images, or inconsistent classes.
    """
    return _scan_folder(
        _folder_root(data),
        data.train_split,
        data.eval_split,
        data.holdout_fraction,
    )


def split_examples(folder: Folder, split: str, data) -> tuple:
    """(paths, labels) of one split of a scanned folder.

    Raises:
      DatasetError: the folder has no such split (the message says how to
        make one).
    """
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
                f"({data.train_split}/, {split}/)"
            )
        raise DatasetError(
            f"Received: split={split!r}, which {data.dataset!r} does not "
            f"have: {hint}."
        )
    return folder.splits[split]
