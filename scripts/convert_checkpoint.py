"""Converts a reference SimCLR TF2 checkpoint or SavedModel into a run dir.

Usage:
  python scripts/convert_checkpoint.py \
      --source=gs://.../r50_1x_sk1/saved_model/ --output_dir=/tmp/r50_1x_sk1

`--source` is a training checkpoint of the reference TF2 code
(`model_dir/ckpt-N` or its model_dir) or a SavedModel of its `save()`
(the released SimCLRv2/v1 TF2 models, `.../saved_model/` or
`.../saved_model/N/`). Writes `config.json` and `flags.cfg` with the
inferred architecture, our checkpoint and our SavedModel export
(`saved_model/<step>/`, with `serving_default`) to `--output_dir`, and
prints what it found. See README.md, "Use the released SimCLR models".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_SOURCE = flags.DEFINE_string(
    "source", None, "Reference checkpoint, model_dir or SavedModel."
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "New run directory to write."
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size",
    None,
    "Image size of the export's serving signatures; default 32 for the "
    "CIFAR stem, else 224.",
)
_FT_PROJ_SELECTOR = flags.DEFINE_integer(
    "ft_proj_selector",
    0,
    "Projection-head layer the supervised head reads (not recorded in the "
    "weights; the reference default is 0).",
)
flags.mark_flags_as_required(["source", "output_dir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Imported here so that flag errors and --help need no TensorFlow.
    from simclr_tf import convert, interop

    try:
        source, arch, export_dir = convert.convert(
            _SOURCE.value,
            _OUTPUT_DIR.value,
            image_size=_IMAGE_SIZE.value,
            ft_proj_selector=_FT_PROJ_SELECTOR.value,
        )
    except interop.SourceError as e:
        sys.stderr.write(f"convert_checkpoint.py: error: {e}\n")
        sys.exit(2)
    print(interop.describe(source, arch))
    print(f"wrote {_OUTPUT_DIR.value} (config.json, flags.cfg, checkpoint)")
    print(f"export {export_dir}")


if __name__ == "__main__":
    app.run(main)
