"""Quickstart: SimCLR on real handwritten digits, offline, in minutes on a CPU.

Usage:
  python -m pip install -e ".[quickstart]" && python scripts/quickstart.py
  python scripts/quickstart.py --workdir=/tmp/simclr_quickstart \
      [--flagfile=flags/quickstart.cfg] [any run.py flag, e.g. --seed=1]

Steps, all through the code path a user's image folder takes
(`simclr_tf.experiment.run` on `--dataset=folder:<workdir>/digits`):

1. Writes scikit-learn's `load_digits` (1,797 real 8x8 handwritten digits,
   10 classes, shipped inside the scikit-learn wheel) as PNG files:
   `<workdir>/digits/{train,test}/<class>/<index>.png`, a stratified
   1,437 / 360 split.
2. SimCLR pretraining on the train split (`flags/quickstart.cfg`), then
   its kNN monitor and linear head on the test split, and the SavedModel
   export (`<workdir>/pretrain/saved_model/<step>/`).
3. Linear evaluation of the pretrained encoder: frozen encoder
   (`--train_mode=finetune --fine_tune_after_block=4`), a linear head
   trained from `--checkpoint=<workdir>/pretrain`, and the kNN monitor.
4. The same linear evaluation and kNN for the same architecture with
   random weights (no checkpoint), every BN gamma initialised to 1
   (`--nozero_init_residual_bn`, the stronger random baseline): the
   baseline.
5. Prints the report (accuracies side by side, runtime, where the
   checkpoint, TensorBoard logs and SavedModel are) and writes PNG plots
   with `scripts/plot_run.py` into `<workdir>/plots/`: curves.png,
   augmentations.png and embedding.png (t-SNE maps of the test images'
   features under the SimCLR and the random encoder).

Flags given on the command line apply to every stage; the linear-eval
stages then override the fields in `LINEAR_EVAL` (see flags/quickstart.cfg
for the equivalent run.py commands). Each stage's config is the parsed
flags' config with its overrides (`simclr_tf.config.replace`), and its
`flags.cfg` is written from that config. An existing `<workdir>` is
reused: finished stages are not rerun (delete it for a fresh run).
"""

from __future__ import annotations

import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from absl import app, flags, logging  # noqa: E402

from simclr_tf import cli  # noqa: E402
from simclr_tf import config as config_lib  # noqa: E402

DEFAULT_RECIPE = os.path.join(REPO, "flags", "quickstart.cfg")
DEFAULT_WORKDIR = "/tmp/simclr_quickstart"
TEST_SIZE = 360  # 20 % of 1,797, stratified: 1,437 train / 360 test.
SPLIT_SEED = 0

_WORKDIR = flags.DEFINE_string(
    "workdir",
    DEFAULT_WORKDIR,
    "Where the digits, the three runs and the plots are written.",
)

# Stage overrides of the recipe: linear evaluation of a frozen encoder
# (the reference CIFAR-10 linear-eval recipe, flags/cifar10_lineareval.cfg,
# with the quickstart's length and batch).
LINEAR_EVAL = {
    "train_mode": "finetune",
    "fine_tune_after_block": 4,
    "zero_init_logits_layer": True,
    "global_bn": False,
    "optimizer": "momentum",
    "learning_rate": 2.0,
    "weight_decay": 0.0,
    "warmup_epochs": 0.0,
    "train_epochs": 60,
    "train_steps": 0,
}


def write_digits(
    root: str, test_size: int = TEST_SIZE, seed: int = SPLIT_SEED
) -> dict[str, int]:
    """Writes scikit-learn's digits as 8x8 grayscale PNGs in split folders.

    Pixel values 0..16 are scaled to 0..255 (rounded). The split is
    stratified by class (`sklearn.model_selection.train_test_split`), so
    every class has the same share of test images up to rounding.

    Args:
      root: output folder; gets `train/<class>/` and `test/<class>/`.
      test_size: images in the test split.
      seed: seed of the split.

    Returns:
      {"train": count, "test": count}.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    index = np.arange(len(images))
    train, test = train_test_split(
        index, test_size=test_size, stratify=digits.target, random_state=seed
    )
    counts = {}
    for split, rows in (("train", train), ("test", test)):
        for i in rows:
            folder = os.path.join(root, split, str(digits.target[i]))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(
                os.path.join(folder, f"{i:04d}.png")
            )
        counts[split] = len(rows)
    return counts


def _digits_ready(root: str) -> bool:
    marker = os.path.join(root, "DONE")
    return os.path.exists(marker)


def prepare_digits(root: str) -> dict[str, int]:
    """`write_digits` once: a finished export is marked and reused."""
    marker = os.path.join(root, "DONE")
    if _digits_ready(root):
        with open(marker) as f:
            return json.load(f)
    counts = write_digits(root)
    with open(marker, "w") as f:
        json.dump(counts, f)
    return counts


def _read_result(model_dir: str) -> dict | None:
    """result.json's metrics, with flags.json's flags under "flags"."""
    path = os.path.join(model_dir, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    flags_path = os.path.join(model_dir, "flags.json")
    if not os.path.exists(flags_path):  # Older runs kept them in result.
        return result
    with open(flags_path) as f:
        return dict(result, flags=json.load(f))


def stage_configs(
    base: config_lib.Config, workdir: str
) -> dict[str, config_lib.Config]:
    """The configs of the three runs, from the parsed flags' config.

    Args:
      base: the config of the command line (recipe and user flags).
      workdir: the quickstart's folder (digits in `<workdir>/digits`).

    Returns:
      {"pretrain", "linear_eval", "random_linear_eval"} -> config, each
      with `model_dir=<workdir>/<name>`.

    Raises:
      ConfigError: an override the command-line flags make invalid.
    """
    base = config_lib.replace(
        base, dataset=f"folder:{os.path.join(workdir, 'digits')}"
    )
    pre_dir = os.path.join(workdir, "pretrain")
    overrides = {
        "pretrain": {},
        "linear_eval": dict(LINEAR_EVAL, checkpoint=pre_dir),
        "random_linear_eval": dict(
            LINEAR_EVAL,
            checkpoint=None,
            # The strong random baseline: every BN gamma starts at 1. With
            # the reference's gamma = 0 on the residual branches a random
            # ResNet is a chain of strided 1x1 shortcut convs.
            zero_init_residual_bn=False,
            keep_hub_module_max=-1,
        ),
    }
    return {
        name: config_lib.replace(
            base, model_dir=os.path.join(workdir, name), **values
        )
        for name, values in overrides.items()
    }


def run_stage(name: str, config: config_lib.Config) -> dict:
    """Runs run.py's job in-process on `config`.

    Prepares the run (`experiment.prepare`: the checks that can refuse
    it), writes `flags.cfg` (replayable with run.py's `--flagfile`) to the
    config's model_dir, then runs the experiment. A stage whose
    `result.json` exists is skipped.

    Returns:
      The stage's result.json contents plus "flags" (flags.json) and
      "seconds".
    """
    from simclr_tf import experiment

    model_dir = config.train.model_dir
    done = _read_result(model_dir)
    if done is not None:
        logging.info("%s: already done in %s, reusing it.", name, model_dir)
        return dict(done, seconds=float("nan"))
    print(f"== {name}: {model_dir}", flush=True)
    start = time.perf_counter()
    # As run.py: every check that can refuse the stage before any write.
    setup = experiment.prepare(config)
    cli.write_flags_file(model_dir, config)
    experiment.run(config, setup)
    seconds = time.perf_counter() - start
    return dict(_read_result(model_dir), seconds=seconds)


def _pct(results: dict, key: str) -> str:
    value = results.get(key)
    return "    -" if value is None else f"{100 * value:5.1f}"


def _stage_time(pretrain: dict) -> str:
    if pretrain["seconds"] != pretrain["seconds"]:  # NaN: reused.
        return "pretraining reused from an earlier run"
    return f"pretraining and its eval {pretrain['seconds'] / 60:.1f} min"


def format_report(
    workdir: str, pretrain: dict, simclr: dict, random: dict, seconds: float
) -> str:
    """The printed report: accuracies side by side, then file locations."""
    lin, knn = "eval/label_top_1_accuracy", "eval/knn_top_1_accuracy"
    pre_dir = os.path.join(workdir, "pretrain")
    exports = os.path.join(pre_dir, "saved_model")
    steps = []
    if os.path.isdir(exports):
        steps = sorted(os.listdir(exports), key=int)
    k = pretrain["flags"]["knn_k"]
    gain_lin = 100 * (simclr[lin] - random[lin])
    gain_knn = 100 * (simclr[knn] - random[knn])
    lines = [
        "",
        "SimCLR quickstart: scikit-learn digits (1,437 train / 360 test "
        "images, 10 classes)",
        f"  encoder: ResNet-{pretrain['flags']['resnet_depth']}, base width "
        f"{pretrain['flags']['resnet_base_width']}, "
        f"{pretrain['flags']['image_size']}x"
        f"{pretrain['flags']['image_size']} input; "
        f"{pretrain['global_step']} pretraining steps",
        "",
        f"  test accuracy (%)        linear eval   kNN (k={k})",
        f"  SimCLR encoder                 {_pct(simclr, lin)}        "
        f"{_pct(simclr, knn)}",
        f"  random encoder (same arch.)*   {_pct(random, lin)}        "
        f"{_pct(random, knn)}",
        f"  SimCLR - random                {gain_lin:+5.1f}        "
        f"{gain_knn:+5.1f}",
        f"  (linear head trained during pretraining: "
        f"{_pct(pretrain, lin).strip()} %)",
        "  * random weights, fresh BN statistics, all BN gammas 1",
        "",
        f"  runtime: {seconds / 60:.1f} min ({_stage_time(pretrain)})",
        f"  checkpoint:       {pre_dir}/ckpt-{pretrain['global_step']}",
        f"  TensorBoard:      tensorboard --logdir {workdir}",
        f"  SavedModel:       {exports}/{steps[-1] if steps else '?'}",
        f"  linear classifier: {os.path.join(workdir, 'linear_eval')}"
        "/saved_model/",
        f"  plots:            {os.path.join(workdir, 'plots')}/",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import plot_run

    from simclr_tf import devices

    devices.initialize_devices()  # Before TensorFlow prints anything.
    start = time.perf_counter()
    workdir = os.path.abspath(_WORKDIR.value)
    digits = os.path.join(workdir, "digits")
    counts = prepare_digits(digits)
    print(
        f"== digits: {counts['train']} train / {counts['test']} test PNGs "
        f"in {digits}",
        flush=True,
    )
    try:
        configs = stage_configs(cli.config_from_flags(), workdir)
        pretrain = run_stage("SimCLR pretraining", configs["pretrain"])
        simclr = run_stage(
            "linear eval of the SimCLR encoder", configs["linear_eval"]
        )
        random = run_stage(
            "linear eval of a random encoder", configs["random_linear_eval"]
        )
    except config_lib.ConfigError as e:
        sys.stderr.write(f"quickstart.py: error: {e}\n")
        sys.exit(2)
    pre_dir = configs["pretrain"].train.model_dir
    random_dir = configs["random_linear_eval"].train.model_dir
    plots = plot_run.plot_runs(
        {
            "pretrain": pre_dir,
            "linear_eval": os.path.join(workdir, "linear_eval"),
            "random_linear_eval": random_dir,
        },
        os.path.join(workdir, "plots"),
        preview_model_dir=pre_dir,
    )
    # The encoders of the report's two rows, side by side (their exports).
    plots.append(
        plot_run.write_embedding(
            {
                "SimCLR encoder (pretrain)": pre_dir,
                "random encoder (random_linear_eval)": random_dir,
            },
            os.path.join(workdir, "plots", "embedding.png"),
        )
    )
    seconds = time.perf_counter() - start
    print(format_report(workdir, pretrain, simclr, random, seconds))
    for path in plots:
        print(f"  plot: {path}")


if __name__ == "__main__":
    sys.argv = [sys.argv[0], f"--flagfile={DEFAULT_RECIPE}", *sys.argv[1:]]
    app.run(main)
