"""Writes a PNG grid of images and their SimCLR augmented views.

Usage:
  python scripts/preview_augmentations.py --dataset=folder:/data/images \
      --output=/tmp/views.png [--split=train] [--num_images=8] \
      [--num_views=4] [run.py's flags: --image_size=224, \
      --color_jitter_strength=1.0, --color_jitter_impl=v2, --use_blur, \
      --min_crop_area=0.08, --use_flip, --holdout_fraction, --seed, \
      --data_dir, ... or --flagfile=flags/<recipe>.cfg]

Each row shows one image of the split (the column labelled "original",
padded to a square, not cropped), then `--num_views` independent
pretraining views ("view 1", ...) made exactly as training makes them
(`simclr_tf.data.input_pipeline.preview_images`), at 1.25 inches per
tile; the title names the augmentations. The data and augmentation flags
are run.py's own (`simclr_tf/cli.py`), so a recipe previews with
`--flagfile`; `--dataset` takes the same values: a TFDS name (prepared in
`--data_dir`) or `folder:/path`. Training logs the same kind of grid to
TensorBoard (`train/augmented_views`) when it starts.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from simclr_tf import cli  # noqa: E402
from simclr_tf.config import ConfigError  # noqa: E402

_SPLIT = flags.DEFINE_string(
    "split",
    "train",
    "Split to take images from: --train_split, or any other split of the "
    "dataset (image folders: a subfolder, or the part --holdout_fraction "
    "holds out).",
)
_OUTPUT = flags.DEFINE_string("output", None, "Path of the PNG to write.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Rows: images shown.")
_NUM_VIEWS = flags.DEFINE_integer("num_views", 4, "Augmented views per image.")
flags.mark_flag_as_required("output")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not cli.FLAGS["dataset"].present:
        raise app.UsageError("Give --dataset (a TFDS name or folder:/path).")
    # Imported here so that flag errors and --help need no TensorFlow.
    from simclr_tf import devices

    devices.initialize_devices()
    import plot_run

    from simclr_tf.data import input_pipeline, sources

    try:
        data = cli.config_from_flags().data
        if _SPLIT.value != data.train_split:
            # A folder holds out --holdout_fraction as the eval split.
            data = dataclasses.replace(data, eval_split=_SPLIT.value)
        originals, views = input_pipeline.preview_images(
            sources.open_source(data),
            data,
            split=_SPLIT.value,
            num_images=_NUM_IMAGES.value,
            num_views=_NUM_VIEWS.value,
        )
    except ConfigError as e:
        sys.stderr.write(f"preview_augmentations.py: error: {e}\n")
        sys.exit(2)
    plot_run.plot_augmentations(
        originals.numpy(),
        views.numpy(),
        _OUTPUT.value,
        plot_run.augmentation_title(data),
    )
    print(
        f"Wrote {_OUTPUT.value}: {len(originals)} images x (original + "
        f"{_NUM_VIEWS.value} views), labelled."
    )


if __name__ == "__main__":
    app.run(main)
