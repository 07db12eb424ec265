"""The console of a run shows no false alarms (issue 17, item 6).

Each check runs the code in a fresh process where TensorFlow's C++ logs
reach stderr unfiltered (no TF_CPP_MIN_LOG_LEVEL), as a user sees them.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simclr_tf import devices

REPO = Path(__file__).resolve().parents[1]
CUINIT = "failed call to cuInit"


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_stderr_filter_drops_only_matching_lines(capfd):
    lines = [
        b"E0000 12:00:00.0 1 cuda_platform.cc:52] failed call to cuInit: x\n",
        b"E0000 12:00:00.0 1 other.cc:7] a real error\n",
        b"W0000 12:00:00.0 1 other.cc:8] a warning\n",
    ]
    with devices.stderr_without(devices.CUINIT_ERROR):
        for line in lines:
            os.write(2, line)
    err = capfd.readouterr().err
    assert err == (lines[1] + lines[2]).decode()


@pytest.mark.slow
def test_device_probe_prints_no_cuinit_error_without_a_driver():
    if devices.cuda_driver_present():
        pytest.skip("a CUDA driver is installed: cuInit errors are real")
    probe = "import tensorflow as tf; tf.config.list_physical_devices()"
    # The unfiltered probe prints it on this machine, so the check below
    # is not vacuous.
    assert CUINIT in _python(probe).stderr
    # As a library user calls it: TensorFlow imported first.
    quiet = (
        "import tensorflow as tf\n"
        "from simclr_tf import config, distribute\n"
        "distribute.build_strategy(config.RuntimeConfig())\n"
        "print(float(tf.reduce_sum(tf.ones(3))))\n"
    )
    result = _python(quiet)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "3.0"
    assert CUINIT not in result.stderr


HIDDEN = ("sklearn", "scipy", "matplotlib")


@pytest.mark.slow
def test_tensorflow_import_leaves_sklearn_scipy_matplotlib_out_until_asked():
    code = (
        "import sys\n"
        "from simclr_tf import devices\n"
        "devices.initialize_devices()\n"
        "import keras\n"
        f"print(*(m in sys.modules for m in {HIDDEN}))\n"
        "from sklearn import linear_model\n"
        "print(linear_model.LogisticRegression().fit("
        "[[0.0], [1.0]], [0, 1]).predict([[1.0]])[0])\n"
        "import matplotlib\n"
        "matplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n"
        "print(plt.figure().number)\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "False", "False", "1", "1"]
    # Without the guard TensorFlow's import brings all three in.
    plain = _python(
        f"import sys, tensorflow\nprint(*(m in sys.modules for m in {HIDDEN}))"
    )
    assert plain.stdout.split() == ["True", "True", "True"]


@pytest.mark.slow
def test_tensorflow_datasets_is_imported_only_to_open_a_tfds_source():
    code = (
        "import sys\n"
        "from simclr_tf import devices\n"
        "devices.initialize_devices()\n"
        "from simclr_tf import config, experiment\n"
        "from simclr_tf.data import sources\n"
        "print('tensorflow_datasets' in sys.modules)\n"
        "try:\n"
        "    sources.open_source(config.DataConfig(dataset='no_such_set'))\n"
        "except sources.DatasetError as e:\n"
        "    print('tensorflow_datasets' in sys.modules)\n"
        "    print('not a TFDS dataset' in str(e))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "True", "True"]


def _image_folder(root: Path, classes: int, per_class: int) -> Path:
    for label in range(classes):
        folder = root / "train" / str(label)
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((8, 8), 10 * i % 256, np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_run_logs_where_the_flags_are_instead_of_listing_them(tmp_path):
    model_dir = tmp_path / "run"
    images = _image_folder(tmp_path / "images", 2, 4)
    # mode=eval with nothing to evaluate passes every pre-write check,
    # writes and logs the flags, then stops at once (exit status 2).
    result = _python(
        "",
        "run.py",
        "--flagfile=flags/smoke.cfg",
        f"--model_dir={model_dir}",
        f"--dataset=folder:{images}",
        "--eval_split=train",
        "--mode=eval",
        "--eval_timeout_secs=0",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "nothing was evaluated" in result.stderr
    # Said at once: what it waits for, where, and how to stop waiting.
    assert f"no checkpoint in {model_dir} yet" in result.stderr
    assert "--eval_timeout_secs" in result.stderr
    flags_cfg = (model_dir / "flags.cfg").read_text()
    assert "--resnet_depth=18" in flags_cfg
    assert str(model_dir / "flags.cfg") in result.stderr
    assert "--resnet_depth" not in result.stderr
    if not devices.cuda_driver_present():
        assert CUINIT not in result.stderr


@pytest.mark.slow
def test_augmentation_summary_discards_no_partial_cache(tmp_path):
    # More images than the summary's shuffle buffer (8 x 50): a cached
    # pipeline would be read in part and warn when discarded.
    _image_folder(tmp_path / "images", 3, 150)
    code = (
        "import gc, sys\n"
        "from simclr_tf import config, experiment\n"
        "from simclr_tf.data import sources\n"
        "data = config.DataConfig(dataset='folder:' + sys.argv[1],\n"
        "    image_size=16, cache_dataset=True)\n"
        "experiment._preview_images(\n"
        "    config.Config(data=data), sources.open_source(data), True, 2)\n"
        "gc.collect()\n"
        "print('done')\n"
    )
    result = _python(code, str(tmp_path / "images"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "done"
    assert "did not fully read the dataset being cached" not in result.stderr
