r"""SimCLR pretraining, fine-tuning and evaluation.

Usage:
  python run.py --mode=train_then_eval --train_batch_size=4096 \
      --model_dir=/tmp/simclr
  python run.py --flagfile=flags/cifar10_pretrain.cfg --model_dir=/tmp/c10

Every flag is a field of simclr_tf/config.py, defined as a flag by
simclr_tf/cli.py; `--help` lists them by group, `--helpfull` adds absl's.
"""

import os
import sys

from absl import app, logging

from simclr_tf import cli, devices
from simclr_tf.config import ConfigError


def parse_and_validate(argv: list[str]) -> list[str]:
    """Parses flags and builds the config (which checks every value)
    before any TensorFlow work, so that `--only_check_args` also checks
    values.

    `--help` prints our flags grouped as the config is and exits 0
    (absl's own `--help` lists only flags defined in this file, none).
    """
    if any(arg in cli.HELP_ARGS for arg in argv[1:]):
        sys.stdout.write((__doc__ or "") + cli.help_text())
        sys.exit(0)
    remaining = app.parse_flags_with_usage(argv)
    try:
        cli.config_from_flags()
    except ConfigError as e:
        sys.stderr.write(f"run.py: error: {e}\n")
        sys.exit(2)
    return remaining


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = cli.config_from_flags()
    if not config.train.model_dir:
        sys.stderr.write(
            "run.py: error: Received: model_dir=None. Pass --model_dir=DIR "
            "for checkpoints, logs and results.\n"
        )
        sys.exit(2)
    # Before TensorFlow is imported (its import under absl.app queries the
    # devices): no false cuInit error on a CPU-only machine.
    devices.initialize_devices()
    # Imported here so that flag errors and --helpfull need no TensorFlow.
    from simclr_tf import experiment

    try:
        # Strategy, data source and every check that can refuse the run
        # (data, model_dir, --checkpoint, --teacher),
        # before any file is written to model_dir.
        setup = experiment.prepare(config)
    except ConfigError as e:
        sys.stderr.write(f"run.py: error: {e}\n")
        sys.exit(2)
    cli.write_flags_file(config.train.model_dir, config)
    # The full flag list is in the file, not the console.
    logging.info(
        "Flags: %s (replay with --flagfile=).",
        os.path.join(config.train.model_dir, "flags.cfg"),
    )
    try:
        experiment.run(config, setup)
    except ConfigError as e:
        # A user error found once data or checkpoints are read: one line.
        sys.stderr.write(f"run.py: error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_and_validate)
