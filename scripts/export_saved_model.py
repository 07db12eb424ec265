"""Exports a checkpoint of a training run as a SavedModel (TF Serving, TF Hub).

Usage:
  python scripts/export_saved_model.py --model_dir=/tmp/simclr \
      [--export_dir=/tmp/simclr_export] [--checkpoint=/tmp/simclr/ckpt-500] \
      [--num_classes=10]

Rebuilds the model from `<model_dir>/config.json` (written by run.py),
restores the latest checkpoint of `model_dir` (or `--checkpoint`) and writes
the export of `simclr_tf.export` to `--export_dir` (default
`<model_dir>/saved_model/<step>`, where run.py also exports at the end of
training). The number of classes comes from the checkpoint's supervised
head unless `--num_classes` is given. See README.md, "Serving and TF Hub",
for how to load and serve the export.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Directory of the training run (config.json, ckpt-*)."
)
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir",
    None,
    "Where to write the SavedModel; default <model_dir>/saved_model/<step>.",
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint prefix; default the latest in model_dir."
)
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes",
    None,
    "Classes of the supervised head; default read from the checkpoint.",
)
flags.mark_flag_as_required("model_dir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Imported here so that flag errors and --help need no TensorFlow.
    from simclr_tf import export

    try:
        export_dir = export.export_checkpoint(
            _MODEL_DIR.value,
            export_dir=_EXPORT_DIR.value,
            checkpoint=_CHECKPOINT.value,
            num_classes=_NUM_CLASSES.value,
        )
    except export.ExportError as e:
        sys.stderr.write(f"export_saved_model.py: error: {e}\n")
        sys.exit(2)
    metadata = export.load_metadata(export_dir)
    print(f"Exported {export_dir}")
    for name, io in metadata["signatures"].items():
        print(f"  {name}: {io['inputs']} -> {io['outputs']}")


if __name__ == "__main__":
    app.run(main)
