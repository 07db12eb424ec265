"""Tests of the config -> model mapping (SPEC.md §3-4, PARAMS.md)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf.models import factory, heads, layers

# PARAMS.md, every row: (depth, sk_ratio, image_size, classes) ->
# (total trainable, total non-trainable, encoder trainable, encoder
#  non-trainable, projection trainable, projection non-trainable,
#  supervised trainable, feature dim).
PARAMS_MD = {
    (18, 0.0, 224, 1000): (
        12_285_736, 12_032, 11_180_736, 9_728, 592_000, 2_304, 513_000, 512
    ),
    (18, 0.0625, 224, 1000): (
        12_304_968, 12_160, 11_199_968, 9_856, 592_000, 2_304, 513_000, 512
    ),
    (50, 0.0, 224, 1000): (
        34_216_104, 61_568, 23_508_032, 53_120, 8_659_072, 8_448,
        2_049_000, 2048,
    ),
    (50, 0.0625, 224, 1000): (
        45_923_656, 70_272, 35_215_584, 61_824, 8_659_072, 8_448,
        2_049_000, 2048,
    ),
    (101, 0.0, 224, 1000): (
        53_208_232, 113_792, 42_500_160, 105_344, 8_659_072, 8_448,
        2_049_000, 2048,
    ),
    (18, 0.0, 32, 10): (
        11_770_186, 12_032, 11_173_056, 9_728, 592_000, 2_304, 5_130, 512
    ),
    (50, 0.0, 32, 10): (
        32_179_914, 61_568, 23_500_352, 53_120, 8_659_072, 8_448, 20_490,
        2048,
    ),
}  # fmt: skip


def count(variables) -> int:
    return sum(math.prod(v.shape) for v in variables)


def make_config(**flags) -> config_lib.Config:
    flags.setdefault("resnet_depth", 18)
    flags.setdefault("image_size", 32)
    return config_lib.from_flat(flags)


def bn_layers(layer):
    return [
        lr
        for lr in layer._flatten_layers(include_self=False)
        if isinstance(lr, keras.layers.BatchNormalization)
    ]


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(
            key, marks=[pytest.mark.slow] if key[0] > 18 else [], id=str(key)
        )
        for key in PARAMS_MD
    ],
)
def test_params_match_params_md(key):
    depth, sk, size, classes = key
    config = make_config(resnet_depth=depth, sk_ratio=sk, image_size=size)
    model = factory.build_model(config, classes)
    got = (
        count(model.trainable_weights),
        count(model.non_trainable_weights),
        count(model.encoder.trainable_weights),
        count(model.encoder.non_trainable_weights),
        count(model.projection_head.trainable_weights),
        count(model.projection_head.non_trainable_weights),
        count(model.supervised_head.trainable_weights),
        model.encoder.output_dim,
    )
    assert got == PARAMS_MD[key]
    assert count(model.supervised_head.non_trainable_weights) == 0


@pytest.mark.parametrize(
    "train_mode, lineareval, num_classes, has_head",
    [
        ("pretrain", True, 10, True),
        ("pretrain", False, 10, False),
        ("pretrain", True, None, False),
        ("finetune", False, 10, True),
        ("finetune", True, 10, True),
    ],
)
def test_supervised_head_presence(
    train_mode, lineareval, num_classes, has_head
):
    config = make_config(
        train_mode=train_mode, lineareval_while_pretraining=lineareval
    )
    model = factory.build_model(config, num_classes)
    assert (model.supervised_head is not None) == has_head
    assert factory.has_supervised_head(config, num_classes) == has_head
    if has_head:
        assert model.supervised_head.num_classes == num_classes
        assert model.supervised_head_kernels == [
            model.supervised_head.dense.kernel
        ]


def test_pretrain_and_finetune_wiring():
    pre = factory.build_model(make_config(), 10)
    assert pre.num_views == 2 and pre.stop_gradient_supervised
    fine = factory.build_model(make_config(train_mode="finetune"), 10)
    assert fine.num_views == 1 and not fine.stop_gradient_supervised
    out = fine(tf.zeros((2, 32, 32, 3)), training=False)
    assert tuple(out["logits_sup"].shape) == (2, 10)
    out = pre(tf.zeros((2, 32, 32, 6)), training=False)
    assert tuple(out["logits_sup"].shape) == (4, 10)


def test_finetune_without_labels_is_a_clear_error():
    with pytest.raises(ValueError, match="train_mode=finetune"):
        factory.build_model(make_config(train_mode="finetune"), None)


@pytest.mark.parametrize("train_mode", ["finetune", "pretrain"])
def test_zero_init_logits_only_with_a_checkpoint(train_mode):
    # Reference: the head is zeroed only when `--checkpoint` brings the
    # weights; a fresh run gets RandomNormal(stddev=0.01).
    extra = {"lineareval_while_pretraining": True}
    restored = factory.build_model(
        make_config(
            train_mode=train_mode,
            zero_init_logits_layer=True,
            checkpoint="/pretrained/ckpt-10",
            **extra,
        ),
        10,
    )
    np.testing.assert_array_equal(restored.supervised_head.dense.kernel, 0.0)
    np.testing.assert_array_equal(restored.supervised_head.dense.bias, 0.0)
    fresh = factory.build_model(
        make_config(
            train_mode=train_mode, zero_init_logits_layer=True, **extra
        ),
        10,
    )
    kernel = fresh.supervised_head.dense.kernel.numpy()
    assert 0.005 < kernel.std() < 0.015  # RandomNormal(stddev=0.01).


def test_fine_tune_after_block_only_when_finetuning():
    fine = factory.build_model(
        make_config(train_mode="finetune", fine_tune_after_block=4), 10
    )
    assert [p.trainable for p in fine.encoder.parts] == [False] * 5
    assert not fine.encoder.trainable_variables
    expected = {
        id(v)
        for part in (fine.projection_head, fine.supervised_head)
        for v in part.trainable_variables
    }
    assert {id(v) for v in fine.trainable_variables} == expected
    # Linear eval: a training step leaves every encoder variable,
    # BN statistics included, bit-identical.
    before = [v.numpy() for v in fine.encoder.weights]
    fine(tf.random.uniform((4, 32, 32, 3), seed=2), training=True)
    for v, old in zip(fine.encoder.weights, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), old)
    # A config rejects it in pretraining (ConfigError); the factory, given
    # one forged past that check, does not freeze.
    with pytest.raises(config_lib.ConfigError, match="fine_tune_after_block"):
        make_config(fine_tune_after_block=2)
    forged = make_config(train_steps=1)  # A TrainConfig of its own.
    object.__setattr__(forged.train, "fine_tune_after_block", 2)
    pre = factory.build_model(forged, 10)
    assert all(p.trainable for p in pre.encoder.parts)


@pytest.mark.parametrize("global_bn", [True, False])
def test_batch_norm_options_reach_every_bn(global_bn):
    config = make_config(global_bn=global_bn, batch_norm_decay=0.95)
    model = factory.build_model(config, 10)
    bns = bn_layers(model)
    assert len(bns) == 21 + 3  # encoder + projection head
    for bn in bns:
        assert bn.synchronized == global_bn
        assert bn.momentum == 0.95
        assert bn.epsilon == 1e-5


@pytest.mark.parametrize("size, cifar", [(32, True), (64, False)])
def test_stem_follows_image_size(size, cifar):
    model = factory.build_model(make_config(image_size=size), 10)
    assert model.encoder.cifar_stem == cifar
    kernel = model.encoder.stem.convs[0].kernel
    assert tuple(kernel.shape) == ((3, 3, 3, 64) if cifar else (7, 7, 3, 64))
    out = model(tf.zeros((1, size, size, 6)), training=False)
    side = size if cifar else size // 4
    assert tuple(out["initial_max_pool"].shape) == (2, side, side, 64)


def test_model_options_are_passed():
    config = make_config(
        width_multiplier=2,
        sk_ratio=0.0625,
        se_ratio=0.25,
        proj_head_mode="nonlinear",
        num_proj_layers=2,
        proj_out_dim=32,
        ft_proj_selector=-1,
    )
    model = factory.build_model(config, 7)
    enc = model.encoder
    assert (enc.depth, enc.width_multiplier) == (18, 2)
    assert (enc.sk_ratio, enc.se_ratio) == (0.0625, 0.25)
    head = model.projection_head
    assert isinstance(head, heads.ProjectionHead)
    assert (head.mode, head.num_layers, head.out_dim) == ("nonlinear", 2, 32)
    assert model.ft_proj_selector == -1
    # Selector -1: the supervised head reads the 32-wide projection.
    assert tuple(model.supervised_head.dense.kernel.shape) == (32, 7)
    assert isinstance(
        enc.block_groups[0].blocks[0].se, layers.SqueezeExcitation
    )


def test_model_is_built_and_follows_the_global_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = factory.build_model(make_config(), 10)
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.built and model.weights
    assert model.encoder.stem.convs[0].compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model.weights)
    out = model(tf.zeros((1, 32, 32, 6)), training=False)
    assert all(v.dtype == tf.float32 for v in out.values())
    # Building leaves the policy alone.
    factory.build_model(make_config(), 10)
    assert keras.mixed_precision.global_policy().name == "float32"
