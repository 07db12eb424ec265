"""Runs run.py on generated TFDS data: no download, no dataset needed.

Usage:
  python scripts/run_on_mock_data.py --flagfile=flags/smoke.cfg \
      --model_dir=/tmp/simclr_smoke

Takes run.py's flags. `tfds.testing.mock_data` replaces every TFDS dataset
by random images and labels of the right shapes (MOCK_EXAMPLES per split,
default 48), so the whole pipeline (pretraining, linear eval, kNN, export)
runs offline. The accuracies it reports are meaningless; the smoke tests
and the README's first command use it to show that everything runs.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow_datasets as tfds  # noqa: E402
from absl import app  # noqa: E402

import run  # noqa: E402

MOCK_EXAMPLES = int(os.environ.get("MOCK_EXAMPLES", "48"))

if __name__ == "__main__":
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        app.run(run.main, flags_parser=run.parse_and_validate)
