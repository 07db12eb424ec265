"""TensorFlow's device initialisation without a false alarm on CPU hosts.

The `tensorflow` wheel is built with CUDA. On a machine without a CUDA
driver its first device query logs an ERROR-level "failed call to cuInit"
line, although the CPU works as intended. The alternatives are worse:
`TF_CPP_MIN_LOG_LEVEL=3` hides every error, `CUDA_VISIBLE_DEVICES=""`
does not stop the probe, and hiding GPUs with `tf.config` needs the probe
first. (The `tensorflow-cpu` wheel does not probe at all.)

`initialize_devices` imports TensorFlow and queries its devices with
that one line filtered out, and only where no CUDA driver can be loaded
(with a driver, a failing cuInit is a real problem and stays visible).
Every other line, errors included, is printed unchanged. Under
`absl.app.run` the first import of TensorFlow already queries the devices
(a callback of `tensorflow.python.distribute.combinations`), so entry
points call this before anything imports TensorFlow; this module itself
does not import it at load time.

Importing TensorFlow also imports Keras's optional helpers, and with them
whatever they use that is installed: the scikit-learn wrappers import
scikit-learn and SciPy (0.7 s and about 60 MiB of resident memory on a
2-core machine), the image-gallery plots `matplotlib.pyplot` (0.3 s,
25 MiB), and TensorFlow's legacy `tf.compat.v1` Keras imports SciPy for
its sparse-input checks (0.15 s, 10 MiB), although a run uses none of
them. `initialize_devices` hides those packages
(`OPTIONAL_KERAS_DEPENDENCIES`) from that first import (Keras then
defines its helpers as when they are not installed, so
`keras.visualization`'s plots would ask for matplotlib in such a
process, and the legacy Keras takes no SciPy sparse input); a later
`import sklearn`, `import scipy` or `import matplotlib` (the
logistic-regression evaluation, the quickstart's data,
`scripts/plot_run.py`) works as usual.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# The CUDA probe's line (absl log format, e.g. "E0000 ... cuda_platform.cc:52]
# failed call to cuInit: INTERNAL: CUDA error: ... (303)").
CUINIT_ERROR = re.compile(rb"\] failed call to cuInit\b")


def cuda_driver_present() -> bool:
    """True when the CUDA driver library (libcuda) can be loaded."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def stderr_without(pattern: re.Pattern) -> Iterator[None]:
    """Replays what the block writes to file descriptor 2, minus the lines
    matching `pattern`.

    Works at the descriptor level because TensorFlow's C++ logs bypass
    Python's `sys.stderr`. The replay comes when the block ends.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured:
                if not pattern.search(line):
                    os.write(2, line)


# What Keras (and TensorFlow's legacy Keras) imports at its own import when
# installed, for helpers that a run does not use (scikit-learn wrappers,
# image-gallery plots, SciPy sparse inputs).
OPTIONAL_KERAS_DEPENDENCIES = ("sklearn", "matplotlib", "scipy")


@contextlib.contextmanager
def modules_hidden(names) -> Iterator[None]:
    """Makes `import <name>` raise ImportError inside the block, for each
    of the top-level package `names` not already imported (an imported one
    stays as it is)."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # The import system's "not found".
    try:
        yield
    finally:
        for name in hidden:
            del sys.modules[name]


def initialize_devices() -> list:
    """Imports TensorFlow and initialises its physical devices.

    On Linux without a CUDA driver, the cuInit ERROR line is dropped;
    `OPTIONAL_KERAS_DEPENDENCIES` stay out of TensorFlow's import (see the
    module docstring). Later calls are cheap.

    Returns:
      The physical devices (`tf.config.list_physical_devices()`).
    """
    filter_cuinit = sys.platform.startswith("linux") and not (
        cuda_driver_present()
    )
    quiet = stderr_without(CUINIT_ERROR) if filter_cuinit else None
    with (
        quiet or contextlib.nullcontext(),
        modules_hidden(OPTIONAL_KERAS_DEPENDENCIES),
    ):
        import tensorflow as tf

        return tf.config.list_physical_devices()
