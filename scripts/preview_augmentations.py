"""Writes a PNG grid of images and their SimCLR augmented views.

Usage:
  python scripts/preview_augmentations.py --dataset=folder:/data/images \
      --output=/tmp/views.png [--split=train] [--image_size=224] \
      [--num_images=8] [--num_views=4] [--color_jitter_strength=1.0] \
      [--color_jitter_impl=v2] [--use_blur] [--min_crop_area=0.08] \
      [--use_flip] [--seed=0] [--data_dir=...]

Each row shows one image of the split (the column labelled "original",
padded to a square, not cropped), then `--num_views` independent
pretraining views ("view 1", ...) made exactly as training makes them
(`simclr_tf.data.input_pipeline.preview_images`), at 1.25 inches per
tile; the title names the augmentations. `--dataset` takes
the same values as run.py: a TFDS name (prepared in `--data_dir`) or
`folder:/path`. Training logs the same kind of grid to TensorBoard
(`train/augmented_views`) when it starts.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_DATASET = flags.DEFINE_string(
    "dataset", None, "A TFDS name, or folder:/path for an image folder."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to take images from.")
_OUTPUT = flags.DEFINE_string("output", None, "Path of the PNG to write.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Side of each view.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Rows: images shown.")
_NUM_VIEWS = flags.DEFINE_integer("num_views", 4, "Augmented views per image.")
_STRENGTH = flags.DEFINE_float(
    "color_jitter_strength", 1.0, "Colour jitter strength (0 = off)."
)
_IMPL = flags.DEFINE_enum(
    "color_jitter_impl", "v2", ["v1", "v2"], "Brightness form (SPEC.md §2)."
)
_USE_BLUR = flags.DEFINE_bool("use_blur", True, "Random Gaussian blur.")
_MIN_CROP_AREA = flags.DEFINE_float(
    "min_crop_area", 0.08, "Lower end of the random crop's area fraction."
)
_USE_FLIP = flags.DEFINE_bool("use_flip", True, "Random horizontal flip.")
_HOLDOUT = flags.DEFINE_float(
    "holdout_fraction", 0.0, "Image folders: fraction held out as eval."
)
_SEED = flags.DEFINE_integer(
    "seed", None, "Seed of the views; unset gives new views every run."
)
flags.mark_flags_as_required(["dataset", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Imported here so that flag errors and --help need no TensorFlow.
    from simclr_tf import devices

    devices.initialize_devices()
    import plot_run

    from simclr_tf import config
    from simclr_tf.data import input_pipeline

    data = config.DataConfig(
        dataset=_DATASET.value,
        data_dir=_DATA_DIR.value,
        # Folders: `train` finds split subfolders; any other --split is a
        # subfolder, or the held-out part (--holdout_fraction).
        eval_split=_SPLIT.value,
        image_size=_IMAGE_SIZE.value,
        color_jitter_strength=_STRENGTH.value,
        color_jitter_impl=_IMPL.value,
        use_blur=_USE_BLUR.value,
        min_crop_area=_MIN_CROP_AREA.value,
        use_flip=_USE_FLIP.value,
        holdout_fraction=_HOLDOUT.value,
        seed=_SEED.value,
    )
    try:
        config.validate(config.Config(data=data))
        originals, views = input_pipeline.preview_images(
            data,
            split=_SPLIT.value,
            num_images=_NUM_IMAGES.value,
            num_views=_NUM_VIEWS.value,
        )
    except config.ConfigError as e:
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
