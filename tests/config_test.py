"""Tests of simclr_tf.config: validation rules and derived values."""

import dataclasses
import subprocess
import sys

import pytest

from simclr_tf import config as config_lib
from simclr_tf.config import ConfigError


def _config(**flat):
    return config_lib.from_flat(flat)


@pytest.mark.parametrize(
    "flat, fragment",
    [
        ({"mode": "predict"}, "mode='predict'"),
        ({"train_mode": "selftrain"}, "train_mode='selftrain'"),
        ({"optimizer": "sgd"}, "optimizer='sgd'"),
        ({"learning_rate_scaling": "log"}, "learning_rate_scaling='log'"),
        ({"proj_head_mode": "mlp"}, "proj_head_mode='mlp'"),
        ({"resnet_depth": 42}, "resnet_depth=42"),
        ({"color_jitter_impl": "v3"}, "color_jitter_impl='v3'"),
        ({"mixed_precision": "int8"}, "mixed_precision='int8'"),
        ({"conv_backward": "im2col"}, "conv_backward='im2col'"),
        (
            {"train_mode": "pretrain", "fine_tune_after_block": 2},
            "fine_tune_after_block=2 with train_mode=pretrain",
        ),
        ({"ft_proj_selector": 4}, "ft_proj_selector=4"),
        ({"ft_proj_selector": -5}, "ft_proj_selector=-5"),
        (
            {"proj_head_mode": "linear", "ft_proj_selector": 2},
            "ft_proj_selector=2",
        ),
        (
            {"proj_head_mode": "none", "ft_proj_selector": 1},
            "ft_proj_selector=1",
        ),
        ({"teacher": "/t"}, "teacher='/t' with train_mode=pretrain"),
        ({"train_mode": "distill"}, "train_mode=distill without --teacher"),
        (
            {"train_mode": "distill", "teacher": "/t", "distill_alpha": 1.5},
            "distill_alpha=1.5",
        ),
        (
            {"train_mode": "distill", "teacher": "/t", "distill_alpha": -0.1},
            "distill_alpha=-0.1",
        ),
        (
            {
                "train_mode": "distill",
                "teacher": "/t",
                "distill_temperature": 0,
            },
            "distill_temperature=0",
        ),
        (
            {
                "train_mode": "distill",
                "teacher": "/t",
                "fine_tune_after_block": 4,
            },
            "fine_tune_after_block=4 with train_mode=distill",
        ),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"temperature": -0.1}, "temperature=-0.1"),
        ({"train_batch_size": 0}, "train_batch_size=0"),
        ({"eval_batch_size": -8}, "eval_batch_size=-8"),
        ({"train_steps": -1}, "train_steps=-1"),
        ({"eval_steps": -1}, "eval_steps=-1"),
        ({"train_steps": 0, "train_epochs": 0}, "train_epochs=0"),
        ({"proj_out_dim": 0}, "proj_out_dim=0"),
        ({"image_size": 7}, "image_size=7"),
        (
            {"proj_head_mode": "nonlinear", "num_proj_layers": 0},
            "num_proj_layers=0",
        ),
        ({"sk_ratio": 1.0}, "sk_ratio=1.0"),
        ({"sk_ratio": -0.1}, "sk_ratio=-0.1"),
        ({"se_ratio": 1.5}, "se_ratio=1.5"),
        ({"dataset": "folder:"}, "dataset='folder:'"),
        ({"min_crop_area": 0.0}, "min_crop_area=0.0"),
        ({"holdout_fraction": 1.0}, "holdout_fraction=1.0"),
        ({"grad_cache_chunk_size": -1}, "grad_cache_chunk_size=-1"),
        ({"keep_hub_module_max": -2}, "keep_hub_module_max=-2"),
    ],
)
def test_each_rule_names_the_value(flat, fragment):
    with pytest.raises(ConfigError) as e:
        _config(**flat)
    message = str(e.value)
    assert fragment in message
    assert "\n" not in message


def test_valid_edges_pass():
    for flat in [
        {"ft_proj_selector": -4},  # [input, h1, h2, h3][-4] is the input.
        {"ft_proj_selector": 3},
        {"proj_head_mode": "linear", "ft_proj_selector": -1},
        {"proj_head_mode": "none", "ft_proj_selector": 0},
        {"proj_head_mode": "none", "num_proj_layers": 0},
        {"train_mode": "finetune", "fine_tune_after_block": 4},
        {"sk_ratio": 0.0625, "se_ratio": 0.25},
        {"image_size": 8},
        {"train_steps": 5, "train_epochs": 0},
        {"keep_hub_module_max": 0},  # Keeps all.
        {"keep_hub_module_max": -1},  # No export.
    ]:
        _config(**flat)


def test_defaults_are_the_reference_defaults():
    flat = config_lib.to_flat(config_lib.Config())
    reference = {
        "learning_rate": 0.3,
        "learning_rate_scaling": "linear",
        "warmup_epochs": 10,
        "weight_decay": 1e-6,
        "batch_norm_decay": 0.9,
        "train_batch_size": 512,
        "train_split": "train",
        "train_epochs": 100,
        "train_steps": 0,
        "eval_steps": 0,
        "eval_batch_size": 256,
        "checkpoint_epochs": 1,
        "checkpoint_steps": 0,
        "eval_split": "validation",
        "dataset": "imagenet2012",
        "cache_dataset": False,
        "mode": "train",
        "train_mode": "pretrain",
        "lineareval_while_pretraining": True,
        "checkpoint": None,
        "zero_init_logits_layer": False,
        "fine_tune_after_block": -1,
        "master": None,
        "model_dir": None,
        "data_dir": None,
        "use_tpu": False,
        "tpu_name": None,
        "tpu_zone": None,
        "gcp_project": None,
        "optimizer": "lars",
        "momentum": 0.9,
        "eval_name": None,
        "keep_checkpoint_max": 5,
        "keep_hub_module_max": 1,
        "temperature": 0.1,
        "hidden_norm": True,
        "proj_head_mode": "nonlinear",
        "proj_out_dim": 128,
        "num_proj_layers": 3,
        "ft_proj_selector": 0,
        "global_bn": True,
        "width_multiplier": 1,
        "resnet_depth": 50,
        "sk_ratio": 0.0,
        "se_ratio": 0.0,
        "image_size": 224,
        "color_jitter_strength": 1.0,
        "use_blur": True,
    }
    assert {k: flat[k] for k in reference} == reference


def test_flat_round_trip_and_unknown_field():
    c = _config(temperature=0.5, resnet_depth=18, model_dir="/x")
    assert config_lib.from_flat(config_lib.to_flat(c)) == c
    assert c.loss.temperature == 0.5 and c.model.resnet_depth == 18
    with pytest.raises(ConfigError, match="temprature"):
        config_lib.from_flat({"temprature": 0.5})


def test_config_is_frozen():
    c = config_lib.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.loss.temperature = 1.0


def test_cifar_stem_threshold():
    assert config_lib.use_cifar_stem(32)
    assert config_lib.use_cifar_stem(16)
    assert not config_lib.use_cifar_stem(33)
    assert not config_lib.use_cifar_stem(224)


def test_num_proj_hiddens():
    m = config_lib.ModelConfig
    assert config_lib.num_proj_hiddens(m(proj_head_mode="none")) == 0
    assert config_lib.num_proj_hiddens(m(proj_head_mode="linear")) == 1
    assert config_lib.num_proj_hiddens(m(num_proj_layers=2)) == 2


def test_config_module_does_not_import_tensorflow():
    code = (
        "import sys; import simclr_tf.config, simclr_tf.cli; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_group_checks_itself_on_construction_and_replace():
    # No separate validation step: an invalid group cannot be built, also
    # not by dataclasses.replace.
    with pytest.raises(ConfigError, match="resnet_depth=42"):
        config_lib.ModelConfig(resnet_depth=42)
    with pytest.raises(ConfigError, match="temperature=0"):
        dataclasses.replace(config_lib.LossConfig(), temperature=0)
    with pytest.raises(ConfigError, match="knn_k=-1"):
        config_lib.replace(config_lib.Config(), knn_k=-1)


def test_replace_changes_fields_across_groups_by_flag_name():
    base = _config(resnet_depth=18, seed=3)
    changed = config_lib.replace(
        base, train_mode="finetune", fine_tune_after_block=4, image_size=32
    )
    assert changed.train.train_mode == "finetune"
    assert changed.train.fine_tune_after_block == 4
    assert changed.data.image_size == 32
    # Untouched fields and groups keep their values.
    assert changed.model == base.model and changed.data.seed == 3
    assert changed.loss is base.loss
    with pytest.raises(ConfigError, match="temprature"):
        config_lib.replace(base, temprature=0.5)


def test_every_field_has_a_help_text_and_enums_their_choices():
    for f in config_lib.fields():
        assert f.metadata["help"].strip(), f.name
    choices = {
        f.name: f.metadata["choices"]
        for f in config_lib.fields()
        if "choices" in f.metadata
    }
    assert choices == {
        "color_jitter_impl": ("v1", "v2"),
        "resnet_depth": (18, 34, 50, 101, 152, 200),
        "proj_head_mode": ("none", "linear", "nonlinear"),
        "optimizer": ("momentum", "adam", "lars"),
        "learning_rate_scaling": ("linear", "sqrt"),
        "mode": ("train", "eval", "train_then_eval"),
        "train_mode": ("pretrain", "finetune", "distill"),
        "mixed_precision": ("auto", "none", "bfloat16", "float16"),
        "conv_backward": ("auto", "tf", "matmul"),
    }
    for f in config_lib.fields():
        if "choices" in f.metadata:
            assert f.default in f.metadata["choices"], f.name


def test_constants_shared_with_the_layers_agree():
    # config.py cannot import the Keras layers (no TensorFlow there), so
    # the values both sides accept are tied here.
    from simclr_tf.models import heads, resnet

    assert config_lib.PROJ_HEAD_MODES == heads.PROJ_HEAD_MODES
    assert sorted(config_lib.RESNET_DEPTHS) == sorted(resnet.BLOCKS)
