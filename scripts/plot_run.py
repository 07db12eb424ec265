"""Writes PNG plots of runs from their TensorBoard events and config.

Usage:
  python scripts/plot_run.py --output_dir=/tmp/plots /tmp/run1 [/tmp/run2 ...]
  python scripts/plot_run.py --output_dir=/tmp/plots pre=/tmp/pre lin=/tmp/lin
  python scripts/plot_run.py --output_dir=/tmp/plots --embedding \
      simclr=/tmp/pre random=/tmp/random_lin [--embedding_split=test]

Each positional argument is a model_dir (optionally `label=model_dir`).
Writes:
  curves.png  one row per run, each on its own step axis: the loss
              (contrastive, or the supervised loss of a fine-tuning or
              linear-eval run) and the accuracies: contrastive accuracy,
              the linear head's training-batch accuracy (lines), and the
              test accuracy of the linear head and of the kNN monitor
              (eval/label_top_1_accuracy, eval/knn_top_1_accuracy; markers
              with their value, one per evaluation).
              When a run logged them, its row also shows the
              training-health monitors train/proj_std (projection std,
              collapse -> 0) and train/rankme (RankMe effective rank of the
              encoder features); a panel no run has is not drawn.
  augmentations.png  the augmentation preview of the first run (or
              --preview_model_dir): a labelled grid of originals and
              pretraining views made as training makes them, from that
              run's config.json (`input_pipeline.preview_images`).
  embedding.png  with --embedding: a 2-D t-SNE map of each run's encoder
              features (final_avg_pool, the kNN monitor's features) of
              every image of a split (default: the run's eval split),
              coloured by class, one panel per run side by side. The
              encoder comes from the run's newest SavedModel export, else
              its latest checkpoint.
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
FEATURE_KEY = "final_avg_pool"  # The kNN monitor's features.
PROJ_STD = "train/proj_std"
RANKME = "train/rankme"
# Optional panels (tag, title): drawn when at least one run has the tag.
HEALTH_PANELS = (
    (PROJ_STD, "projection std (collapse -> 0)"),
    (RANKME, "RankMe effective rank (collapse -> 1)"),
)


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


SUPERVISED_LOSS = "train/supervised_loss"
# Accuracy lines (training batches) and markers (evaluations): tag, label.
ACC_LINES = (
    (CONTRAST_ACC, "contrastive accuracy (train batch)"),
    (TRAIN_ACC, "linear head, train batch"),
)
ACC_MARKERS = (
    (EVAL_ACC, "linear head, test", "o"),
    (KNN_ACC, "kNN, test", "*"),
)


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _xy(points):
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    return steps, values


# Resolution of every PNG written here.
DPI = 100
# Inches per image of the augmentation grid: digits (8 px) become 125 px.
AUGMENTATION_TILE_INCHES = 1.25


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    fig.clf()
    return path


def _plot_run_row(axes, label: str, scalars: dict) -> None:
    """Loss and accuracy panels of one run, on the run's own steps."""
    loss_ax, acc_ax = axes
    for tag, name in (
        (CONTRAST_LOSS, "contrastive loss (NT-Xent)"),
        (SUPERVISED_LOSS, "supervised loss"),
    ):
        if tag in scalars:
            loss_ax.plot(*_xy(scalars[tag]), label=name)
    for (tag, name), colour in zip(ACC_LINES, ("C0", "C1"), strict=True):
        if tag in scalars:
            acc_ax.plot(*_xy(scalars[tag]), color=colour, alpha=0.7, label=name)
    finals = {t: scalars[t][-1][1] for t, _, _ in ACC_MARKERS if t in scalars}
    for (tag, name, marker), colour in zip(
        ACC_MARKERS, ("C2", "C3"), strict=True
    ):
        if tag not in scalars:
            continue
        steps, values = _xy(scalars[tag])
        acc_ax.plot(
            steps, values, marker, color=colour, markersize=11, label=name
        )
        # The value left of its marker; two close values move apart.
        others = [v for t, v in finals.items() if t != tag]
        shift = 0
        if others and abs(others[0] - values[-1]) < 0.08:
            shift = 7 if values[-1] >= others[0] else -7
        acc_ax.annotate(
            f"{100 * values[-1]:.1f}%",
            (steps[-1], values[-1]),
            xytext=(-10, shift),
            textcoords="offset points",
            ha="right",
            va="center",
            color=colour,
            fontweight="bold",
        )
    loss_ax.set_title(f"{label}: loss")
    loss_ax.set_ylabel("loss")
    acc_ax.set_title(f"{label}: accuracy")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0.0, 1.05)
    for ax in axes:
        ax.set_xlabel(f"training step of {label}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")


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

    One row per run (stages have their own step counts, so each has its
    own x-axis): the loss panel and the accuracy panel, where the test
    accuracies of the linear head and of the kNN monitor (the comparison
    the README calls fair for a frozen encoder) are labelled markers.
    When a run logged them, the training-health panels of
    `health_panels(runs)` follow in its row.

    Args:
      runs: scalars of each run, as returned by `read_scalars`.
      path: PNG path to write.

    Returns:
      `path`.
    """
    plt = _matplotlib()
    extra = health_panels(runs)
    fig, axes = plt.subplots(
        len(runs),
        2 + len(extra),
        figsize=(6 * (2 + len(extra)), 3.6 * len(runs)),
        squeeze=False,
    )
    for row, (label, scalars) in zip(axes, runs.items(), strict=True):
        _plot_run_row(row[:2], label, scalars)
        for ax, (tag, title) in zip(row[2:], extra, strict=True):
            if tag not in scalars:
                ax.axis("off")  # This run did not log the monitor.
                continue
            ax.plot(*_xy(scalars[tag]))
            ax.set_title(f"{label}: {title}")
            ax.set_xlabel(f"training step of {label}")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def augmentation_figsize(n: int, k: int) -> tuple[float, float]:
    """(width, height) in inches of the grid of n images and k views each:
    one tile per image, plus margins for the labels and the title."""
    tile = AUGMENTATION_TILE_INCHES
    return tile * (k + 1) + 0.4, tile * n + 0.9


def plot_augmentations(
    originals: np.ndarray, views: np.ndarray, path: str, title: str = ""
) -> str:
    """Writes a labelled grid: each row an original, then its views.

    Args:
      originals: (n, S, S, 3) in [0, 1], padded to a square.
      views: (n, S, S, 3k) in [0, 1], the k pretraining views.
      path: PNG path to write.
      title: figure title (e.g. the augmentation settings).

    Returns:
      `path`.
    """
    plt = _matplotlib()
    originals, views = np.asarray(originals), np.asarray(views)
    n, k = originals.shape[0], views.shape[-1] // 3
    fig, axes = plt.subplots(
        n,
        k + 1,
        figsize=augmentation_figsize(n, k),
        squeeze=False,
        gridspec_kw=dict(wspace=0.06, hspace=0.06),
    )
    for i in range(n):
        images = [originals[i]] + np.split(views[i], k, axis=-1)
        for j, (ax, image) in enumerate(zip(axes[i], images, strict=True)):
            ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:  # The original stands out with a thick frame.
                for spine in ax.spines.values():
                    spine.set_linewidth(3)
                    spine.set_color("C0")
    axes[0][0].set_title("original", fontsize=11, color="C0")
    for j in range(k):
        axes[0][j + 1].set_title(f"view {j + 1}", fontsize=11)
    fig.suptitle(
        title
        or "Each row: one training image, then independent SimCLR views of it",
        fontsize=11,
    )
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9)
    _save(fig, path)
    plt.close(fig)
    return path


def augmentation_title(data) -> str:
    """The preview's title: what the views are made with (a DataConfig)."""
    parts = [f"random crop (area >= {data.min_crop_area:g})"]
    if data.use_flip:
        parts.append("flip")
    if data.color_jitter_strength > 0:
        parts.append(f"colour jitter (strength {data.color_jitter_strength:g})")
    if data.use_blur:
        parts.append("blur")
    return (
        "Each row: one training image (left, padded), then independent "
        f"pretraining views\n{', '.join(parts)}; {data.image_size}x"
        f"{data.image_size} px"
    )


def write_preview(model_dir: str, path: str, num_images: int = 8) -> str:
    """Writes the augmentation preview of a run as a labelled PNG grid.

    The images are `input_pipeline.preview_images` of the run's data
    config (`model_dir/config.json`), drawn by `plot_augmentations`.

    Args:
      model_dir: a run's directory with config.json.
      path: PNG path to write.
      num_images: rows of the grid.

    Returns:
      `path`.
    """
    from simclr_tf import config as config_lib
    from simclr_tf.data import input_pipeline, sources

    with open(os.path.join(model_dir, "config.json")) as f:
        config = config_lib.from_flat(json.load(f))
    originals, views = input_pipeline.preview_images(
        sources.open_source(config.data), config.data, num_images=num_images
    )
    return plot_augmentations(
        originals.numpy(),
        views.numpy(),
        path,
        augmentation_title(config.data),
    )


def _read_config(model_dir: str):
    from simclr_tf import config as config_lib

    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No config.json in {model_dir!r}. Pass the --model_dir of a "
            "run of run.py."
        )
    with open(path) as f:
        return config_lib.from_flat(json.load(f))


def load_encoder(model_dir: str):
    """The encoder of a run: its newest SavedModel export, else the latest
    checkpoint restored into the float32 model of its config.json and
    run_info.json.

    Returns:
      (fn, source): fn maps preprocessed images (B, S, S, 3) to the
      (B, D) float32 `final_avg_pool` features (what the kNN monitor
      uses); source says which export or checkpoint was read.

    Raises:
      FileNotFoundError: the run has neither, or (for a checkpoint) no
        run_info.json.
    """
    import tensorflow as tf

    from simclr_tf import run_info
    from simclr_tf.models import factory

    exports = os.path.join(model_dir, "saved_model")
    steps = []
    if os.path.isdir(exports):
        steps = sorted(int(n) for n in os.listdir(exports) if n.isdigit())
    if steps:
        path = os.path.join(exports, str(steps[-1]))
        module = tf.saved_model.load(path)
        return (
            lambda images: module(images, training=False)[FEATURE_KEY],
            f"export {path}",
        )
    path = tf.train.latest_checkpoint(model_dir)
    if path is None:
        raise FileNotFoundError(
            f"No SavedModel export or checkpoint in {model_dir!r}."
        )
    try:
        num_classes = run_info.read(model_dir).num_classes
    except run_info.RunInfoError as e:
        raise FileNotFoundError(str(e)) from e
    model = factory.build_model(_read_config(model_dir), num_classes, "float32")
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    return (
        lambda images: model(images, training=False)[FEATURE_KEY],
        f"checkpoint {path}",
    )


def embedding_features(model_dir: str, split: str | None = None) -> dict:
    """Encoder features of every image of a split of a run's dataset.

    Args:
      model_dir: a run's directory (config.json and an export or
        checkpoint, see `load_encoder`).
      split: the split; default the run's eval split.

    Returns:
      {"features": (N, D) float32, "labels": (N,) int, "class_names":
      names or None, "source": the export or checkpoint read, "split"}.
    """
    import tensorflow as tf

    from simclr_tf.data import input_pipeline, sources

    config = _read_config(model_dir)
    split = split or config.data.eval_split
    encode, source = load_encoder(model_dir)
    data_source = sources.open_source(config.data)
    dataset = input_pipeline.build_dataset(
        data_source,
        config.data,
        batch_size=config.eval.eval_batch_size,
        is_training=False,
        split=split,
    )
    features, labels = [], []
    for images, one_hot in dataset:
        features.append(np.asarray(encode(images), np.float32))
        labels.append(np.asarray(tf.argmax(one_hot, axis=1)))
    info = data_source.info
    return {
        "features": np.concatenate(features),
        "labels": np.concatenate(labels),
        "class_names": info.class_names,
        "source": source,
        "split": split,
    }


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of L2-normalised features (the kNN monitor's cosine
    geometry); (N, D) -> (N, 2)."""
    from sklearn.manifold import TSNE

    x = features / np.maximum(
        np.linalg.norm(features, axis=1, keepdims=True), 1e-12
    )
    perplexity = min(30.0, (len(x) - 1) / 3)
    return TSNE(
        n_components=2, init="pca", perplexity=perplexity, random_state=seed
    ).fit_transform(x)


def _knn_result(model_dir: str) -> str:
    path = os.path.join(model_dir, "result.json")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        value = json.load(f).get(KNN_ACC)
    return "" if value is None else f"; kNN test top-1 {100 * value:.1f}%"


def plot_embeddings(panels: dict[str, dict], path: str) -> str:
    """Writes side-by-side 2-D maps, points coloured by class.

    Args:
      panels: {title: {"points": (N, 2), "labels": (N,), "class_names":
        names or None}}.
      path: PNG path to write.

    Returns:
      `path`.
    """
    plt = _matplotlib()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6.2 * len(panels), 6.4), squeeze=False
    )
    classes = max(int(p["labels"].max()) + 1 for p in panels.values())
    cmap = plt.get_cmap("tab10" if classes <= 10 else "tab20")
    for ax, (title, panel) in zip(axes[0], panels.items(), strict=True):
        labels = panel["labels"]
        names = panel.get("class_names")
        for c in np.unique(labels):
            xy = panel["points"][labels == c]
            name = names[c] if names is not None else str(c)
            ax.scatter(*xy.T, s=14, color=cmap(int(c) % 20), label=name)
        ax.set_title(title, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(
        title="class", loc="center left", bbox_to_anchor=(1.0, 0.5)
    )
    fig.suptitle(
        "t-SNE of the encoders' features (final_avg_pool) of the same "
        "images, coloured by class.\nTight, separate clusters: classes are "
        "easy to tell apart. Axes and distances between clusters carry no "
        "meaning.",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def write_embedding(
    runs: dict[str, str], path: str, split: str | None = None
) -> str:
    """Writes the t-SNE maps of the encoders of `runs` ({label: model_dir})
    on a split (default each run's eval split), one panel per run."""
    panels = {}
    for label, model_dir in runs.items():
        got = embedding_features(model_dir, split)
        title = (
            f"{label}\n{len(got['labels'])} {got['split']} images"
            f"{_knn_result(model_dir)}"
        )
        panels[title] = dict(
            points=tsne_2d(got["features"]),
            labels=got["labels"],
            class_names=got["class_names"],
        )
    return plot_embeddings(panels, path)


def plot_runs(
    runs: dict[str, str],
    output_dir: str,
    preview_model_dir: str | None = None,
    embedding: bool = False,
    embedding_split: str | None = None,
) -> list[str]:
    """Writes curves.png of `runs`, augmentations.png of one run and, when
    asked, embedding.png of all of them.

    Args:
      runs: {label: model_dir}.
      output_dir: folder for the PNGs.
      preview_model_dir: run whose augmentation is previewed (default: the
        first of `runs`).
      embedding: also write the t-SNE maps of the runs' encoders.
      embedding_split: their split (default: each run's eval split).

    Returns:
      The paths written.
    """
    scalars = {label: read_scalars(d) for label, d in runs.items()}
    paths = [plot_curves(scalars, os.path.join(output_dir, "curves.png"))]
    preview = preview_model_dir or next(iter(runs.values()))
    paths.append(
        write_preview(preview, os.path.join(output_dir, "augmentations.png"))
    )
    if embedding:
        paths.append(
            write_embedding(
                runs, os.path.join(output_dir, "embedding.png"), embedding_split
            )
        )
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="model_dir or label=model_dir")
    parser.add_argument("--output_dir", required=True, help="PNG folder.")
    parser.add_argument(
        "--preview_model_dir", default=None, help="Run to preview."
    )
    parser.add_argument(
        "--embedding",
        action="store_true",
        help="Also write embedding.png: t-SNE maps of the runs' encoders.",
    )
    parser.add_argument(
        "--embedding_split",
        default=None,
        help="Split for --embedding (default: each run's eval split).",
    )
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, _, path = item.rpartition("=")
        runs[label or os.path.basename(os.path.normpath(path))] = path
    from simclr_tf import devices

    devices.initialize_devices()
    try:
        paths = plot_runs(
            runs,
            args.output_dir,
            args.preview_model_dir,
            args.embedding,
            args.embedding_split,
        )
    except FileNotFoundError as e:
        parser.exit(2, f"plot_run.py: error: {e}\n")
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
