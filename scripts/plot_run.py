"""Writes PNG plots of runs from their TensorBoard events and config.

Usage:
  python scripts/plot_run.py --output_dir=/tmp/plots /tmp/run1 [/tmp/run2 ...]
  python scripts/plot_run.py --output_dir=/tmp/plots pre=/tmp/pre lin=/tmp/lin

Each positional argument is a model_dir (optionally `label=model_dir`).
Writes:
  curves.png  contrastive loss, contrastive accuracy (train/contrast_loss,
              train/contrast_acc) and linear-head accuracy over steps: the
              training accuracy train/supervised_acc as lines and the eval
              accuracy eval/label_top_1_accuracy (one point per evaluation)
              as markers, one colour per run; when a run logged them,
              also the training-health monitors train/proj_std
              (projection std, collapse -> 0) and train/rankme (RankMe
              effective rank of the encoder features). A curve a run
              lacks is left out; a panel no run has is not drawn.
  augmentations.png  the augmentation preview of the first run (or
              --preview_model_dir): originals and pretraining views made as
              training makes them, from that run's config.json
              (`simclr_tf.data.input_pipeline.preview_grid`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (tag, y label) of the panels; the third panel also takes the eval tag.
CONTRAST_LOSS = "train/contrast_loss"
CONTRAST_ACC = "train/contrast_acc"
TRAIN_ACC = "train/supervised_acc"
EVAL_ACC = "eval/label_top_1_accuracy"
KNN_ACC = "eval/knn_top_1_accuracy"
PROJ_STD = "train/proj_std"
RANKME = "train/rankme"
# Optional panels (tag, title): drawn when at least one run has the tag.
HEALTH_PANELS = (
    (PROJ_STD, "projection std (collapse -> 0)"),
    (RANKME, "RankMe effective rank (collapse -> 1)"),
)
PREVIEW_CELL_PIXELS = 48  # Small images are upscaled to this per view.


def read_scalars(model_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar summary in the TensorBoard event files of `model_dir`.

    Reads `model_dir/events.out.tfevents.*` (not subfolders) in file
    order; TF2 summaries store scalars as 0-d tensors, TF1 ones as
    `simple_value`, and both are read. Non-scalar summaries (images) are
    skipped. A step written twice (a resumed run) keeps the last value.

    Args:
      model_dir: a run's directory.

    Returns:
      {tag: [(step, value), ...]} sorted by step.

    Raises:
      FileNotFoundError: no event file in `model_dir`.
    """
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(model_dir, "events.out.tfevents.*")))
    if not files:
        raise FileNotFoundError(
            f"No TensorBoard event files in {model_dir!r}. Pass the "
            "--model_dir of a run (it holds events.out.tfevents.*)."
        )
    scalars: dict[str, dict[int, float]] = {}
    for path in files:
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = float(value.simple_value)
                elif value.HasField("tensor"):
                    array = tf.make_ndarray(value.tensor)
                    if array.ndim != 0 or array.dtype.kind not in "fiu":
                        continue
                    number = float(array)
                else:
                    continue
                scalars.setdefault(value.tag, {})[int(event.step)] = number
    return {tag: sorted(points.items()) for tag, points in scalars.items()}


def _xy(points):
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    return steps, values


def health_panels(
    runs: dict[str, dict[str, list[tuple[int, float]]]],
) -> list[tuple[str, str]]:
    """The (tag, title) of each health panel that some run has data for."""
    return [
        (tag, title)
        for tag, title in HEALTH_PANELS
        if any(tag in scalars for scalars in runs.values())
    ]


def plot_curves(
    runs: dict[str, dict[str, list[tuple[int, float]]]], path: str
) -> str:
    """Writes the curves PNG of `runs` ({label: scalars}).

    Three panels (contrastive loss, contrastive accuracy, linear-head
    accuracy), then one per `health_panels(runs)`, each 5 inches wide.

    Args:
      runs: scalars of each run, as returned by `read_scalars`.
      path: PNG path to write.

    Returns:
      `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = health_panels(runs)
    fig, axes = plt.subplots(
        1, 3 + len(extra), figsize=(15 + 5 * len(extra), 4.2)
    )
    panels = [
        (axes[0], CONTRAST_LOSS, "contrastive loss (NT-Xent)"),
        (axes[1], CONTRAST_ACC, "contrastive accuracy"),
    ] + [(axes[3 + i], tag, title) for i, (tag, title) in enumerate(extra)]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, scalars) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        for ax, tag, _ in panels:
            if tag in scalars:
                ax.plot(*_xy(scalars[tag]), color=colour, label=label)
        if TRAIN_ACC in scalars:
            axes[2].plot(
                *_xy(scalars[TRAIN_ACC]),
                color=colour,
                alpha=0.6,
                label=f"{label}: train batch",
            )
        if EVAL_ACC in scalars:
            axes[2].plot(
                *_xy(scalars[EVAL_ACC]),
                "o",
                color=colour,
                markersize=8,
                label=f"{label}: test",
            )
    for ax, _, title in panels:
        ax.set_title(title)
    axes[2].set_title("linear-head top-1 accuracy")
    axes[2].set_ylim(0.0, 1.0)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_preview(model_dir: str, path: str, num_images: int = 8) -> str:
    """Writes the augmentation preview grid of a run as a PNG.

    The grid is `input_pipeline.preview_grid` of the run's data config
    (`model_dir/config.json`), upscaled by an integer factor (nearest
    neighbour) so that each view is at least `PREVIEW_CELL_PIXELS` wide.

    Args:
      model_dir: a run's directory with config.json.
      path: PNG path to write.
      num_images: rows of the grid.

    Returns:
      `path`.
    """
    import tensorflow as tf

    from simclr_tf import config as config_lib
    from simclr_tf.data import input_pipeline, sources

    with open(os.path.join(model_dir, "config.json")) as f:
        data = config_lib.from_flat(json.load(f)).data
    grid = input_pipeline.preview_grid(
        sources.open_source(data), data, num_images=num_images
    )
    scale = max(1, -(-PREVIEW_CELL_PIXELS // data.image_size))
    pixels = np.round(grid.numpy()[0] * 255).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(pixels))
    return path


def plot_runs(
    runs: dict[str, str],
    output_dir: str,
    preview_model_dir: str | None = None,
) -> list[str]:
    """Writes curves.png of `runs` and augmentations.png of one run.

    Args:
      runs: {label: model_dir}.
      output_dir: folder for the PNGs.
      preview_model_dir: run whose augmentation is previewed (default: the
        first of `runs`).

    Returns:
      The paths written.
    """
    scalars = {label: read_scalars(d) for label, d in runs.items()}
    paths = [plot_curves(scalars, os.path.join(output_dir, "curves.png"))]
    preview = preview_model_dir or next(iter(runs.values()))
    paths.append(
        write_preview(preview, os.path.join(output_dir, "augmentations.png"))
    )
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="model_dir or label=model_dir")
    parser.add_argument("--output_dir", required=True, help="PNG folder.")
    parser.add_argument(
        "--preview_model_dir", default=None, help="Run to preview."
    )
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, _, path = item.rpartition("=")
        runs[label or os.path.basename(os.path.normpath(path))] = path
    try:
        paths = plot_runs(runs, args.output_dir, args.preview_model_dir)
    except FileNotFoundError as e:
        parser.exit(2, f"plot_run.py: error: {e}\n")
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
