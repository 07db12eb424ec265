"""Tests of scripts/semi_supervised_demo.py: stage configs against the
run.py commands README documents, the report, and a tiny end-to-end run."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import semi_supervised_demo as demo  # noqa: E402

from tests.helpers import parse_run_py  # noqa: E402


def _parse_run_py(*args):
    """The config run.py builds from the quickstart recipe plus `args`."""
    return parse_run_py(ROOT / "flags" / "quickstart.cfg", *args)


# README "SimCLRv2: semi-supervised and distillation": the demo's run.py
# commands, for seed 1, after the quickstart's pretraining.
W = "/tmp/simclr_quickstart"
S = f"{W}/semi_supervised/seed1"
COMMON = [
    f"--dataset=folder:{W}/digits",
    "--seed=1",
    "--keep_hub_module_max=0",
    "--fine_tune_after_block=-1",
    "--zero_init_logits_layer",
    "--noglobal_bn",
    "--optimizer=momentum",
    "--warmup_epochs=0",
    "--train_steps=0",
    "--train_batch_size=64",
    "--checkpoint_epochs=1000",
]
FINETUNE = [
    "--train_mode=finetune",
    "--label_fraction=0.1",
    "--ft_proj_selector=1",
    "--learning_rate=0.025",
    "--train_epochs=100",
    "--weight_decay=0",
    f"--checkpoint={W}/pretrain",
    f"--model_dir={S}/finetune_10pct",
]
DISTILL = [
    "--train_mode=distill",
    f"--teacher={S}/finetune_10pct",
    "--proj_head_mode=none",
    "--learning_rate=0.4",
    "--train_epochs=30",
    "--weight_decay=1e-4",
]
SUPERVISED_SMALL = [
    "--train_mode=finetune",
    "--label_fraction=0.1",
    "--proj_head_mode=none",
    "--resnet_base_width=8",
    "--learning_rate=0.4",
    "--train_epochs=100",
    "--weight_decay=1e-4",
    f"--model_dir={S}/supervised_small",
]


def test_stage_configs_equal_the_documented_run_py_commands():
    configs = demo.stage_configs(_parse_run_py(), W, seed=1)
    assert configs["pretrain"] == _parse_run_py(
        f"--dataset=folder:{W}/digits", f"--model_dir={W}/pretrain"
    )
    assert configs["finetune_10pct"] == _parse_run_py(*COMMON, *FINETUNE)
    assert configs["distill_same"] == _parse_run_py(
        *COMMON, *DISTILL, f"--model_dir={S}/distill_same"
    )
    assert configs["distill_small"] == _parse_run_py(
        *COMMON,
        *DISTILL,
        "--resnet_base_width=8",
        f"--model_dir={S}/distill_small",
    )
    assert configs["supervised_small"] == _parse_run_py(
        *COMMON, *SUPERVISED_SMALL
    )


def test_stages_use_the_protocol_data():
    configs = demo.stage_configs(_parse_run_py(), W, seed=0)
    # Fine-tuning and the baseline see 10 % of the labels; pretraining and
    # distillation every training image.
    for name in ("finetune_10pct", "supervised_small"):
        assert configs[name].data.label_fraction == 0.1
    for name in ("pretrain", "distill_same", "distill_small"):
        assert configs[name].data.label_fraction == 1.0
    # The baseline is the small student's architecture, from scratch.
    small, base = configs["distill_small"], configs["supervised_small"]
    assert small.model == base.model
    assert base.train.checkpoint is None
    assert configs["distill_same"].model.resnet_base_width == 16


def test_report_table_and_mean(tmp_path):
    results = {
        s: {
            name: {demo.TOP1: top1 + s / 100, "seconds": 60.0 * (s + 1)}
            for name, top1 in zip(demo.ROWS, (0.9, 0.8, 0.7, 0.5), strict=True)
        }
        for s in (0, 1)
    }
    table = demo.summarize(results)
    assert math.isclose(table["distill_small"]["mean"], 0.705)
    assert table["supervised_small"]["minutes"] == {"0": 1.0, "1": 2.0}
    text = demo.write_report(str(tmp_path), table, 120.0)
    rows = text.splitlines()
    assert rows[0] == "| test top-1 (%), 360 digits | seed 0 | seed 1 | mean |"
    assert rows[3].split(" | ")[1:] == ["80.0", "81.0", "80.5 |"]
    saved = json.loads(
        (tmp_path / "semi_supervised" / "report.json").read_text()
    )
    assert saved["stages"]["finetune_10pct"]["top1"] == {"0": 0.9, "1": 0.91}
    assert (
        tmp_path / "semi_supervised" / "report.md"
    ).read_text() == text + "\n"


@pytest.mark.slow
def test_tiny_demo_runs_every_stage(tmp_path):
    import quickstart

    from simclr_tf import config as config_lib

    quickstart.prepare_digits(str(tmp_path / "digits"))
    configs = demo.stage_configs(_parse_run_py(), str(tmp_path), seed=0)
    tiny = dict(
        train_steps=2,
        train_batch_size=32,
        steps_per_loop=1,
        knn_train_examples=64,
        mixed_precision="none",
    )
    configs = {
        name: config_lib.replace(c, **tiny) for name, c in configs.items()
    }
    quickstart.run_stage("pretrain", configs["pretrain"])
    results = demo.run_seed(configs)
    assert list(results) == list(demo.ROWS)
    for name, result in results.items():
        assert result["global_step"] == 2, name
        assert 0.0 <= result[demo.TOP1] <= 1.0
    # The students' teacher is the fine-tuned run: its reference top-1 in
    # their result.json is the fine-tuning run's own (same weights, same
    # test images, float32).
    for name in ("distill_same", "distill_small"):
        assert results[name]["eval/teacher_top_1_accuracy"] == pytest.approx(
            results["finetune_10pct"][demo.TOP1]
        )
    table = demo.summarize({0: results})
    text = demo.write_report(str(tmp_path), table, 1.0)
    assert len(text.splitlines()) == 2 + len(demo.ROWS)
