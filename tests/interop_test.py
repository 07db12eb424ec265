"""Loading checkpoints and SavedModels of the reference SimCLR TF2 code.

Fixtures are written in the exact layouts measured from the reference code
(tests/reference_layout.py, checked here against
/work/shared/reference_checkpoints/*.json) and compared with an
independent forward pass of the reference architecture.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import cli, convert, export, interop, interop_names
from simclr_tf import config as config_lib
from simclr_tf.models import factory
from simclr_tf.training import checkpoints
from tests import reference_forward
from tests import reference_layout as rl

JSON_DIR = "/work/shared/reference_checkpoints"
JSON_ARCHS = {
    "r18_cifar": rl.Arch(18, 1, False, 0.0, True, 10, True),
    "r34_2x_sk1_se": rl.Arch(34, 2, True, 0.25, False, 100, True),
    "r50_1x_sk0": rl.Arch(50, 1, False, 0.0, False, 1000, False),
    "r50_1x_sk1": rl.Arch(50, 1, True, 0.0, False, 1000, True),
}
ENDPOINTS = (
    "block_group1",
    "block_group2",
    "block_group3",
    "block_group4",
    "final_avg_pool",
    "proj_head_output",
    "logits_sup",
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _float32():
    keras.mixed_precision.set_global_policy("float32")


def _config(arch: rl.Arch, checkpoint: str, image_size: int, **kw):
    values = dict(
        resnet_depth=arch.depth,
        width_multiplier=1,
        resnet_base_width=arch.base * arch.width,
        sk_ratio=0.0625 if arch.sk else 0.0,
        se_ratio=arch.se_ratio,
        num_proj_layers=max(arch.proj_layers, 1),
        proj_head_mode="nonlinear" if arch.proj_layers else "none",
        image_size=image_size,
        train_mode="finetune",
        checkpoint=checkpoint,
    )
    values.update(kw)
    return config_lib.from_flat(values)


def _relative_diff(ours, theirs) -> float:
    theirs = np.asarray(theirs, np.float64)
    scale = np.max(np.abs(theirs))
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / scale)


@pytest.mark.parametrize("name", sorted(JSON_ARCHS))
def test_fixture_layout_is_the_measured_reference_layout(name):
    path = os.path.join(JSON_DIR, f"{name}.json")
    if not os.path.exists(path):
        pytest.skip(f"{path} not available")
    with open(path) as f:
        measured = json.load(f)
    keys = {
        k.removesuffix("/.ATTRIBUTES/VARIABLE_VALUE"): tuple(s)
        for k, s in measured["training_checkpoint_keys"]
        if k.startswith("model/") and "OPTIMIZER_SLOT" not in k
    }
    names = {n: tuple(s) for n, s in measured["saved_model_variable_names"]}
    variables = rl.layout(JSON_ARCHS[name])
    assert {"model/" + v.path: v.shape for v in variables} == keys
    assert {v.name: v.shape for v in variables} == names


@pytest.mark.parametrize("name", sorted(JSON_ARCHS))
def test_measured_names_fill_our_model_exactly(name):
    path = os.path.join(JSON_DIR, f"{name}.json")
    if not os.path.exists(path):
        pytest.skip(f"{path} not available")
    with open(path) as f:
        measured = json.load(f)
    shapes = {n: tuple(s) for n, s in measured["saved_model_variable_names"]}
    parsed = interop_names.ParsedNames(shapes)
    assert parsed.unknown == []
    theirs = interop_names.source_slots(parsed)
    arch = JSON_ARCHS[name]
    size = 32 if arch.cifar else 224
    config = _config(arch, "", size)
    model = factory.build_model(config, arch.num_classes)
    ours = interop_names.model_slots(model)
    assert set(theirs) == set(ours)
    for slot, var in ours.items():
        assert shapes[theirs[slot]] == tuple(var.shape), slot


# Small fixtures of each layout: narrow base widths keep them fast.
SMALL = {
    "r18_cifar_ckpt": (rl.Arch(18, 1, False, 0.0, True, 10, True, base=8), 16),
    "r34_2x_sk_se_sm": (
        rl.Arch(34, 2, True, 0.25, False, 7, True, base=4),
        48,
    ),
    "r50_sk0_nogbn_ckpt": (
        rl.Arch(50, 1, False, 0.0, False, 5, False, base=8),
        40,
    ),
    "r50_sk1_sm": (rl.Arch(50, 1, True, 0.0, False, 6, True, base=8), 40),
}


def _write(tmp_path, key, arch, values=None):
    variables = rl.layout(arch)
    values = values or rl.random_values(variables, seed=len(key))
    if key.endswith("_sm"):
        directory = str(tmp_path / key / "saved_model" / "700")
        rl.write_saved_model(arch, variables, values, directory)
        return str(tmp_path / key / "saved_model"), values
    return rl.write_checkpoint(
        variables, values, str(tmp_path / key), 700
    ), values


@pytest.mark.parametrize("key", sorted(SMALL))
def test_loaded_model_reproduces_the_reference_outputs(tmp_path, key):
    arch, size = SMALL[key]
    source, values = _write(tmp_path, key, arch)
    config = _config(arch, source, size)
    model = factory.build_model(config, arch.num_classes)
    checkpoints.restore_initial_weights(model, config)
    images = tf.random.stateless_uniform((3, size, size, 3), seed=(1, 2))
    ours = model(images, training=False)
    if key.endswith("_sm"):
        loaded = tf.saved_model.load(source + "/700")
        assert not loaded.signatures
        theirs = loaded(images, trainable=False)
    else:
        theirs = reference_forward.forward(arch, values, images)
    diffs = {k: _relative_diff(ours[k], theirs[k]) for k in ENDPOINTS}
    print(key, {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-5, diffs


def test_names_from_a_busier_process_map_the_same(tmp_path):
    # Keras-2 suffixes depend on what the process built before: a model
    # built third in its process still loads exactly.
    arch, size = SMALL["r18_cifar_ckpt"]
    variables = rl.layout(arch, offset=2)
    assert variables[0].name.endswith("conv2d_fixed_padding_2/conv2d_2/kernel")
    values = rl.random_values(variables, seed=9)
    source = rl.write_checkpoint(variables, values, str(tmp_path / "b"), 1)
    config = _config(arch, source, size)
    model = factory.build_model(config, arch.num_classes)
    checkpoints.restore_initial_weights(model, config)
    images = tf.random.stateless_uniform((2, size, size, 3), seed=(7, 8))
    ours = model(images, training=False)
    theirs = reference_forward.forward(arch, values, images)
    for k in ENDPOINTS:
        assert _relative_diff(ours[k], theirs[k]) <= 1e-5, k


def test_architecture_is_inferred_from_shapes(tmp_path):
    arch, _ = SMALL["r34_2x_sk_se_sm"]
    source, _ = _write(tmp_path, "r34_2x_sk_se_sm", arch)
    found = interop.infer_architecture(interop.detect(source))
    assert (found.resnet_depth, found.resnet_base_width) == (34, 8)
    assert (found.sk_ratio, found.se_ratio) == (0.0625, 0.25)
    assert not found.cifar_stem and found.global_bn
    assert (found.num_proj_layers, found.proj_out_dim) == (3, 128)
    assert found.num_classes == 7
    assert interop.detect(source).step == 700


def test_zero_init_logits_layer_leaves_the_head_new(tmp_path):
    arch, size = SMALL["r18_cifar_ckpt"]
    source, values = _write(tmp_path, "r18", arch)
    config = _config(arch, source, size, zero_init_logits_layer=True)
    checkpoints.check_initial_checkpoint(config, 3)  # 10 -> 3 classes: ok.
    model = factory.build_model(config, 3)
    checkpoints.restore_initial_weights(model, config)
    np.testing.assert_array_equal(model.supervised_head.dense.kernel, 0.0)
    stem = "resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel"
    np.testing.assert_array_equal(model.encoder.stem.conv0.kernel, values[stem])


def _error(tmp_path, arch, size, num_classes, **kw):
    source, _ = _write(tmp_path, "e", arch)
    config = _config(arch, source, size, **kw)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.check_initial_checkpoint(config, num_classes)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_sk_source_with_sk_ratio_zero_names_it(tmp_path):
    arch, size = SMALL["r50_sk1_sm"]
    assert "sk_ratio=0.0625 in the source vs 0.0 here" in _error(
        tmp_path, arch, size, 6, sk_ratio=0.0
    )


def test_more_classes_without_zero_init_names_the_fix(tmp_path):
    arch, size = SMALL["r18_cifar_ckpt"]
    message = _error(tmp_path, arch, size, 3)
    assert "10 classes" in message and "--zero_init_logits_layer" in message


def test_v1_without_projection_head_and_selector_names_the_fix(tmp_path):
    arch = dataclasses.replace(SMALL["r18_cifar_ckpt"][0], proj_layers=0)
    message = _error(
        tmp_path, arch, 16, 10, proj_head_mode="nonlinear", ft_proj_selector=1
    )
    assert "ft_proj_selector" in message and "no projection head" in message


def test_unknown_format_and_truncated_file(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("hello")
    with pytest.raises(checkpoints.CheckpointError, match="not a known"):
        checkpoints.restore_initial_weights(
            None,
            _config(SMALL["r18_cifar_ckpt"][0], str(tmp_path / "junk"), 16),
        )
    arch, size = SMALL["r18_cifar_ckpt"]
    source, _ = _write(tmp_path, "t", arch)
    data = source + ".data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(checkpoints.CheckpointError, match="truncated"):
        checkpoints.check_initial_checkpoint(_config(arch, source, size), 10)


def test_unplaceable_weights_are_listed_and_nothing_loads(tmp_path):
    arch, size = SMALL["r18_cifar_ckpt"]
    variables = rl.layout(arch)
    variables.append(
        rl.Var("resnet_model/extra/kernel", "resnet/odd_thing/kernel", (2,))
    )
    values = rl.random_values(variables)
    source = rl.write_checkpoint(variables, values, str(tmp_path / "x"), 1)
    config = _config(arch, source, size)
    model = factory.build_model(config, 10)
    before = model.encoder.stem.conv0.kernel.numpy()
    with pytest.raises(checkpoints.CheckpointError, match="resnet/odd_thing"):
        checkpoints.restore_initial_weights(model, config)
    np.testing.assert_array_equal(model.encoder.stem.conv0.kernel, before)


@pytest.mark.slow
def test_convert_writes_a_run_dir_whose_export_matches(tmp_path):
    arch, size = SMALL["r50_sk1_sm"]
    source, _ = _write(tmp_path, "r50_sk1_sm", arch)
    out = str(tmp_path / "out")
    src, found, export_dir = convert.convert(source, out, image_size=size)
    assert found.resnet_depth == 50 and src.step == 700
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["sk_ratio"] == 0.0625
    # flags.cfg as run.py writes it: replayed, it gives config.json's config.
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["convert", f"--flagfile={os.path.join(out, 'flags.cfg')}"])
    try:
        replayed = config_lib.to_flat(cli.config_from_flags())
    finally:
        cli.FLAGS.unparse_flags()
    with open(os.path.join(out, "config.json")) as f:
        assert replayed == json.load(f)
    assert replayed["sk_ratio"] == 0.0625 and replayed["model_dir"] == out
    assert tf.train.latest_checkpoint(out).endswith("ckpt-700")
    images = tf.random.stateless_uniform((2, size, size, 3), seed=(3, 4))
    ours = tf.saved_model.load(export_dir)(images, training=False)
    theirs = tf.saved_model.load(source + "/700")(images, trainable=False)
    for k in ENDPOINTS:
        assert _relative_diff(ours[k], theirs[k]) <= 1e-5, k
    assert "serving_default" in tf.saved_model.load(export_dir).signatures
    assert export.load_metadata(export_dir)["num_classes"] == 6


@pytest.mark.slow
def test_run_py_mismatch_exits_2_and_writes_nothing(tmp_path):
    arch, size = SMALL["r50_sk1_sm"]
    source, _ = _write(tmp_path, "r50_sk1_sm", arch)
    images = tmp_path / "data"
    for label in ("a", "b"):
        (images / "train" / label).mkdir(parents=True)
        for i in range(2):
            png = tf.io.encode_png(tf.zeros((8, 8, 3), tf.uint8)).numpy()
            (images / "train" / label / f"{i}.png").write_bytes(png)
    model_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "run.py"),
            f"--dataset=folder:{images}",
            f"--checkpoint={source}",
            f"--model_dir={model_dir}",
            "--train_mode=finetune",
            "--zero_init_logits_layer",
            "--resnet_depth=50",
            "--resnet_base_width=8",
            "--image_size=40",
            "--sk_ratio=0",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("run.py: error:")]
    assert len(errors) == 1 and "sk_ratio=0.0625" in errors[0]
    assert not model_dir.exists()


def test_tf1_checkpoint_is_refused_with_the_alternative(tmp_path):
    prefix = str(tmp_path / "model.ckpt-250228")
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=["base_model/conv2d/kernel", "global_step"],
        shape_and_slices=["", ""],
        tensors=[tf.zeros((7, 7, 3, 64)), tf.constant(250228, tf.int64)],
    )
    with pytest.raises(interop.SourceError, match="TF1 checkpoint") as e:
        interop.detect(prefix)
    assert "SavedModel" in str(e.value)


@pytest.mark.slow
def test_convert_script_prints_what_it_found(tmp_path):
    arch, _ = SMALL["r18_cifar_ckpt"]
    source, values = _write(tmp_path, "r18", arch)
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "convert_checkpoint.py"),
            f"--source={os.path.dirname(source)}",
            f"--output_dir={out}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ResNet-18 1x (base width 8)" in result.stdout
    assert "CIFAR stem" in result.stdout and "10 classes" in result.stdout
    assert "step: 700" in result.stdout and "EMA: none" in result.stdout
    # The export equals the reference forward pass on the source weights.
    images = tf.random.stateless_uniform((2, 16, 16, 3), seed=(5, 6))
    export_dir = str(out / "saved_model" / "700")
    ours = tf.saved_model.load(export_dir)(images, training=False)
    theirs = reference_forward.forward(arch, values, images)
    for k in ENDPOINTS:
        assert _relative_diff(ours[k], theirs[k]) <= 1e-5, k
    again = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "convert_checkpoint.py"),
            f"--source={out}",
            f"--output_dir={tmp_path / 'again'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=300,
    )
    assert again.returncode == 2
    assert "export_saved_model.py" in again.stderr


def test_selector_that_cannot_feed_the_source_head_names_it(tmp_path):
    arch, size = SMALL["r18_cifar_ckpt"]  # head reads the 64-wide encoder
    message = _error(tmp_path, arch, size, 10, ft_proj_selector=-1)
    assert "ft_proj_selector=-1" in message and "128-wide" in message


def test_fixture_saved_model_keys_have_the_measured_layout(tmp_path):
    # The serialiser's key choice (`model/resnet_model/variables/N`,
    # `trainable_variables_list/N`) as measured, counted by pattern.
    path = os.path.join(JSON_DIR, "r18_cifar.json")
    if not os.path.exists(path):
        pytest.skip(f"{path} not available")
    with open(path) as f:
        measured = json.load(f)["saved_model_checkpoint_keys"]
    arch = dataclasses.replace(JSON_ARCHS["r18_cifar"], base=8)
    source, _ = _write(tmp_path, "r18_sm", arch)
    keys = tf.train.list_variables(source + "/700/variables/variables")

    def patterns(pairs):
        return sorted(re.sub(r"/\d+/", "/N/", k) for k, _ in pairs)

    assert patterns(keys) == patterns(measured)


def test_other_se_ratio_names_it_before_loading(tmp_path):
    arch, size = SMALL["r34_2x_sk_se_sm"]
    message = _error(tmp_path, arch, size, 7, se_ratio=0.5)
    assert "se_ratio=0.25 in the source vs 0.5 here" in message
