"""Tests of the command line: flags, recipes, flags.cfg replay, layering."""

import ast
import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest

from simclr_tf import cli
from simclr_tf import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "flags").glob("*.cfg"))


def _parse(*args):
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["run.py", *args])
    return cli.config_from_flags()


@pytest.fixture(autouse=True)
def _reset_flags():
    yield
    cli.FLAGS.unparse_flags()


def test_every_config_field_is_a_flag_and_back():
    names = set(config_lib.field_names())
    defined = {f.name for f in cli.FLAGS.get_key_flags_for_module(cli)}
    assert names == defined


def test_flag_defaults_equal_config_defaults():
    assert _parse() == config_lib.Config()


# What each recipe must contain, from SPEC.md §8 and the paper.
EXPECTED = {
    "cifar10_pretrain.cfg": dict(
        train_mode="pretrain",
        dataset="cifar10",
        image_size=32,
        resnet_depth=18,
        train_batch_size=512,
        train_epochs=1000,
        learning_rate=1.0,
        weight_decay=1e-4,
        temperature=0.5,
        use_blur=False,
        color_jitter_strength=0.5,
        eval_split="test",
    ),
    "cifar10_lineareval.cfg": dict(
        train_mode="finetune",
        fine_tune_after_block=4,
        zero_init_logits_layer=True,
        global_bn=False,
        optimizer="momentum",
        learning_rate=0.1,
        weight_decay=0.0,
        train_epochs=100,
        train_batch_size=512,
        warmup_epochs=0.0,
        dataset="cifar10",
        image_size=32,
        resnet_depth=18,
        eval_split="test",
    ),
    "cifar10_finetune.cfg": dict(
        train_mode="finetune",
        fine_tune_after_block=-1,
        dataset="cifar10",
        image_size=32,
        resnet_depth=18,
    ),
    "imagenet_r50_pretrain.cfg": dict(
        train_mode="pretrain",
        dataset="imagenet2012",
        resnet_depth=50,
        image_size=224,
        train_batch_size=4096,  # The reference README's command.
        learning_rate=0.075,
        learning_rate_scaling="sqrt",
        temperature=0.1,
        weight_decay=1e-4,
        train_epochs=100,
        eval_split="validation",
        use_blur=True,
    ),
    "imagenet_r50_lineareval.cfg": dict(
        train_mode="finetune",
        fine_tune_after_block=4,
        resnet_depth=50,
        dataset="imagenet2012",
        optimizer="momentum",
        learning_rate=0.1,
        train_epochs=90,
        train_batch_size=4096,
    ),
    "imagenet_r50_finetune_1pct.cfg": dict(
        train_mode="finetune",
        dataset="imagenet2012_subset/1pct",
        ft_proj_selector=1,
        num_proj_layers=3,
        optimizer="lars",
        learning_rate=0.005,
        learning_rate_scaling="sqrt",
        train_epochs=60,
        train_batch_size=1024,
        fine_tune_after_block=-1,
    ),
    "imagenet_r50_finetune_10pct.cfg": dict(
        train_mode="finetune",
        dataset="imagenet2012_subset/10pct",
        ft_proj_selector=1,
        optimizer="lars",
        train_epochs=30,
    ),
    # Your own images: pretraining only (no eval split or labels needed).
    "own_images_small.cfg": dict(
        mode="train",
        train_mode="pretrain",
        image_size=32,  # The CIFAR stem.
        resnet_depth=18,
        use_blur=False,
        color_jitter_strength=0.5,
        temperature=0.5,
    ),
    "own_images_imagenet.cfg": dict(
        mode="train",
        train_mode="pretrain",
        image_size=224,
        resnet_depth=50,
        use_blur=True,
        color_jitter_strength=1.0,
        learning_rate_scaling="sqrt",
        temperature=0.1,
    ),
    "imagenet_r50_distill_1pct.cfg": dict(
        train_mode="distill",
        dataset="imagenet2012",  # All training images, labels unused.
        distill_temperature=1.0,
        distill_alpha=1.0,
        proj_head_mode="none",
        resnet_depth=50,
        optimizer="lars",
        learning_rate=0.1,
        learning_rate_scaling="sqrt",
        weight_decay=1e-4,
        train_batch_size=4096,
        train_epochs=400,
        warmup_epochs=20.0,  # 5% of the epochs, as pretraining.
    ),
    "imagenet_r50_distill_10pct.cfg": dict(
        train_mode="distill",
        dataset="imagenet2012",
        distill_temperature=1.0,
        distill_alpha=1.0,
        proj_head_mode="none",
        learning_rate=0.1,
        learning_rate_scaling="sqrt",
        train_epochs=400,
    ),
    "smoke.cfg": dict(
        resnet_depth=18,
        image_size=32,
        train_batch_size=8,
        train_steps=2,
        mode="train_then_eval",
    ),
}


def test_every_recipe_is_checked():
    assert {p.name for p in RECIPES} >= set(EXPECTED)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_into_valid_config(recipe):
    # A distillation recipe needs the user's teacher, as model_dir.
    extra = ["--teacher=/tmp/teacher"] if "distill" in recipe.name else []
    flat = config_lib.to_flat(_parse(f"--flagfile={recipe}", *extra))
    expected = EXPECTED.get(recipe.name, {})
    assert {k: flat[k] for k in expected} == expected


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_has_documented_header(recipe):
    header = recipe.read_text().split("\n--", 1)[0].lower()
    for word in ("command", "expected result", "runtime"):
        assert word in header, f"{recipe.name}: header lacks '{word}'"


def test_flags_file_replays_to_equal_config(tmp_path):
    config = _parse(
        f"--flagfile={ROOT / 'flags' / 'smoke.cfg'}",
        f"--model_dir={tmp_path}",
        "--temperature=0.25",
        "--nohidden_norm",
        "--checkpoint=/some/ckpt",
    )
    cli.write_flags_file(config.train.model_dir)
    config_lib.write_json(config, config.train.model_dir)
    replayed = _parse(f"--flagfile={tmp_path / 'flags.cfg'}")
    assert replayed == config
    assert replayed.loss.temperature == 0.25
    assert replayed.loss.hidden_norm is False
    written = json.loads((tmp_path / "config.json").read_text())
    assert config_lib.from_flat(written) == config


def test_layering_only_cli_touches_absl_flags():
    offenders = []
    for path in (ROOT / "simclr_tf").rglob("*.py"):
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "absl":
                if any(a.name == "flags" for a in node.names):
                    offenders.append(f"{path}: from absl import flags")
            if isinstance(node, ast.Import):
                if any(a.name == "absl.flags" for a in node.names):
                    offenders.append(f"{path}: import absl.flags")
            if isinstance(node, ast.Name) and node.id == "FLAGS":
                offenders.append(f"{path}: names FLAGS")
            if isinstance(node, ast.Attribute) and node.attr == "FLAGS":
                offenders.append(f"{path}: names FLAGS")
    assert not offenders


def _run_py(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_helpfull_lists_all_reference_flags():
    out = _run_py("--helpfull").stdout
    for name in config_lib.field_names():
        assert f"--{name}" in out or f"--[no]{name}" in out, name


@pytest.mark.parametrize("arg", ["--help", "-?"])
def test_help_lists_our_flags_by_group(arg):
    result = _run_py(arg)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # Each group's heading, then each of its flags, in config order.
    position = -1
    for group_name, group in config_lib.GROUPS.items():
        heading = out.index(f"\n{group_name} flags: ")
        assert heading > position, group_name
        position = heading
        for f in dataclasses.fields(group):
            shown = f"--[no]{f.name}:" if f.type == "bool" else f"--{f.name}:"
            found = out.index(shown, position)
            assert found > position, f.name
            position = found
    assert "--[no]use_blur: Gaussian blur" in out
    assert "--train_batch_size: Global training batch size" in out
    assert "(default: '512')" in out
    # Not absl's own flags: those are --helpfull's.
    assert "--[no]alsologtostderr" not in out


def test_only_check_args_on_smoke_recipe():
    result = _run_py("--flagfile=flags/smoke.cfg", "--only_check_args")
    assert result.returncode == 0, result.stderr


def test_invalid_value_is_one_line_before_tensorflow():
    result = _run_py("--temperature=0", "--only_check_args")
    assert result.returncode != 0
    assert "temperature=0.0" in result.stderr
    assert "Traceback" not in result.stderr


def test_misspelt_flag_gets_absl_suggestion():
    result = _run_py("--temprature=0.5", "--only_check_args")
    assert result.returncode != 0
    assert "Did you mean: temperature" in result.stderr


def test_unknown_enum_value_is_rejected():
    result = _run_py("--optimizer=sgd", "--only_check_args")
    assert result.returncode != 0
    assert "optimizer" in result.stderr and "lars" in result.stderr


def test_missing_model_dir_is_a_clear_error():
    result = _run_py("--flagfile=flags/smoke.cfg")
    assert result.returncode == 2
    assert "model_dir=None" in result.stderr


def test_data_error_after_parsing_is_one_line(tmp_path):
    result = _run_py(
        "--flagfile=flags/smoke.cfg",
        f"--model_dir={tmp_path}",
        f"--dataset=folder:{tmp_path / 'no_such_folder'}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no_such_folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # Refused before writing.


def test_flags_file_of_a_config_is_what_absl_serializes(tmp_path):
    # A config built without flags (as scripts do) writes the same lines
    # absl writes for the flags that parse to it, and replays to it.
    config = config_lib.replace(
        _parse(f"--flagfile={ROOT / 'flags' / 'quickstart.cfg'}"),
        model_dir=str(tmp_path),
        train_mode="finetune",
        fine_tune_after_block=4,
        use_flip=True,
        weight_decay=0.0,
        checkpoint="/some ckpt",
    )
    cli.write_flags_file(str(tmp_path), config)
    replayed = _parse(f"--flagfile={tmp_path / 'flags.cfg'}")
    assert replayed == config
    absl_lines = [cli.FLAGS[name].serialize() for name in cli.FLAG_NAMES]
    written = (tmp_path / "flags.cfg").read_text().splitlines()
    assert written == [line for line in absl_lines if line]
