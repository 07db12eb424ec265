"""Exports a checkpoint of a training run as a SavedModel (TF Serving, TF Hub).

Usage:
  python scripts/export_saved_model.py --model_dir=/tmp/simclr \
      [--export_dir=/tmp/simclr_export] [--checkpoint=/tmp/simclr/ckpt-500]

Rebuilds the model from `<model_dir>/config.json` and `run_info.json`
(written by run.py: the architecture, and the dataset's classes), restores
the latest checkpoint of `model_dir` (or `--checkpoint`) and writes the
export of `simclr_tf.export` to `--export_dir` (default
`<model_dir>/saved_model/<step>`, where run.py also exports at the end of
training). See README.md, "Serving and TF Hub", for how to load and serve
the export.
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
flags.mark_flag_as_required("model_dir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Imported here so that flag errors and --help need no TensorFlow.
    from simclr_tf import devices

    devices.initialize_devices()
    from simclr_tf import export

    try:
        export_dir = export.export_checkpoint(
            _MODEL_DIR.value,
            export_dir=_EXPORT_DIR.value,
            checkpoint=_CHECKPOINT.value,
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
