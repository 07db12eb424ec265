"""Step arithmetic, schedule values, optimiser choice and weight-decay loss
(SPEC.md §6)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf import lars, objective
from simclr_tf import optim as optim_lib
from simclr_tf.models import simclr_model


def _schedule(optim, num_examples, global_batch, total_steps):
    """The run's schedule as the experiment builds it from the config."""
    return optim_lib.WarmUpAndCosine(
        optim_lib.scaled_learning_rate(
            optim.learning_rate, optim.learning_rate_scaling, global_batch
        ),
        optim_lib.warmup_steps(optim.warmup_epochs, num_examples, global_batch),
        total_steps,
    )


def _total(train, num_examples):
    return optim_lib.total_train_steps(
        train.train_steps,
        train.train_epochs,
        num_examples,
        train.train_batch_size,
    )


def _every(train, num_examples):
    return optim_lib.checkpoint_every(
        train.checkpoint_steps,
        train.checkpoint_epochs,
        num_examples,
        train.train_batch_size,
    )


def _scaled(optim, global_batch):
    return optim_lib.scaled_learning_rate(
        optim.learning_rate, optim.learning_rate_scaling, global_batch
    )


def _warmup(optim, num_examples, global_batch):
    return optim_lib.warmup_steps(
        optim.warmup_epochs, num_examples, global_batch
    )


def test_scaled_learning_rate():
    optim = config_lib.OptimConfig(learning_rate=0.3)
    assert _scaled(optim, 4096) == pytest.approx(4.8)
    optim = config_lib.OptimConfig(
        learning_rate=0.075, learning_rate_scaling="sqrt"
    )
    # 0.075 * sqrt(4096) = 0.075 * 64.
    assert _scaled(optim, 4096) == pytest.approx(4.8)
    assert _scaled(optim, 256) == pytest.approx(1.2)


def test_step_arithmetic():
    # ImageNet: 1,281,167 images, batch 4096, 100 epochs, 10 warm-up epochs.
    train = config_lib.TrainConfig(train_batch_size=4096, train_epochs=100)
    assert _total(train, 1281167) == 31279
    optim = config_lib.OptimConfig(warmup_epochs=10)
    # round(10 * 1281167 // 4096) = 12811670 // 4096 = 3127.
    assert _warmup(optim, 1281167, 4096) == 3127
    assert _warmup(config_lib.OptimConfig(warmup_epochs=0), 50000, 512) == 0
    # train_steps overrides epochs.
    train = config_lib.TrainConfig(train_steps=7, train_epochs=100)
    assert _total(train, 1281167) == 7
    # Checkpoints: every epoch of round(50000 / 512) = round(97.66) = 98
    # steps (reference; the floor would be 97), or every N steps.
    train = config_lib.TrainConfig(train_batch_size=512)
    assert _every(train, 50000) == 98
    train = config_lib.TrainConfig(train_batch_size=512, checkpoint_epochs=2)
    assert _every(train, 50000) == 2 * 98
    train = config_lib.TrainConfig(train_batch_size=4096)  # 1281167 / 4096
    assert _every(train, 1281167) == 313  # = 312.78
    train = config_lib.TrainConfig(train_batch_size=512)
    assert _every(train, 100) == 1  # Never 0.
    train = config_lib.TrainConfig(checkpoint_steps=10, checkpoint_epochs=3)
    assert _every(train, 50000) == 10


def _lr(schedule, step):
    # The optimizer passes its int64 iteration count; fractional steps
    # (float) probe points between iterations.
    dtype = tf.int64 if isinstance(step, int) else tf.float32
    return float(schedule(tf.constant(step, dtype)).numpy())


def test_linear_scaling_cifar_numbers():
    # lr 0.3, B 512, 50,000 examples, 10 warm-up epochs, 100 epochs:
    # peak = 0.3 * 512 / 256 = 0.6; warm-up = round(500000 // 512) = 976;
    # total = 5,000,000 // 512 + 1 = 9766; cosine over D = 8790 steps.
    optim = config_lib.OptimConfig(learning_rate=0.3, warmup_epochs=10)
    train = config_lib.TrainConfig(train_batch_size=512, train_epochs=100)
    total = _total(train, 50000)
    assert total == 9766
    s = _schedule(optim, 50000, 512, total)
    assert (s.warmup_steps, s.total_steps) == (976, 9766)
    np.testing.assert_allclose(_lr(s, 0), 0.0)
    np.testing.assert_allclose(_lr(s, 488), 0.3, rtol=1e-6)  # mid warm-up
    np.testing.assert_allclose(_lr(s, 976), 0.6, rtol=1e-6)  # end
    np.testing.assert_allclose(_lr(s, 976 + 4395), 0.3, rtol=1e-5)  # mid
    # A quarter of the cosine: 0.3 * (1 + cos(pi / 4)).
    np.testing.assert_allclose(_lr(s, 976 + 2197.5), 0.5121320, rtol=1e-5)
    # Last step run (9765): 0.3 * (1 - cos(pi / 8790)) = 1.916e-8.
    np.testing.assert_allclose(_lr(s, 9765), 1.916078e-8, rtol=1e-2)
    assert _lr(s, 9766) == pytest.approx(0.0, abs=1e-12)


def test_sqrt_scaling_imagenet_numbers():
    # lr 0.075 sqrt, B 4096: peak = 0.075 * 64 = 4.8; 1,281,167 examples:
    # warm-up = 12,811,670 // 4096 = 3127, total = 31278 + 1 = 31279.
    optim = config_lib.OptimConfig(
        learning_rate=0.075, learning_rate_scaling="sqrt", warmup_epochs=10
    )
    s = _schedule(optim, 1281167, 4096, 31279)
    assert s.warmup_steps == 3127
    np.testing.assert_allclose(s.peak_learning_rate, 4.8)
    np.testing.assert_allclose(_lr(s, 0), 0.0)
    np.testing.assert_allclose(_lr(s, 1000), 1.5350176, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 3127), 4.8, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 3127 + 14076), 2.4, rtol=1e-5)
    assert _lr(s, 31279) == pytest.approx(0.0, abs=1e-6)


def test_no_warmup_starts_at_the_peak():
    optim = config_lib.OptimConfig(learning_rate=0.1, warmup_epochs=0)
    s = _schedule(optim, 1000, 256, 101)
    assert s.warmup_steps == 0
    np.testing.assert_allclose(_lr(s, 0), 0.1, rtol=1e-6)
    np.testing.assert_allclose(_lr(s, 50.5), 0.05, rtol=1e-5)
    assert _lr(s, 101) == pytest.approx(0.0, abs=1e-8)


def test_warmup_longer_than_the_run_stays_linear():
    s = optim_lib.WarmUpAndCosine(1.0, warmup_steps=10, total_steps=5)
    np.testing.assert_allclose(_lr(s, 4), 0.4, rtol=1e-6)
    with pytest.raises(ValueError, match="total_steps=0"):
        optim_lib.WarmUpAndCosine(1.0, 0, 0)


def test_schedule_serializes_inside_an_optimizer():
    s = optim_lib.WarmUpAndCosine(0.6, 976, 9766)
    opt = lars.LARS(s)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    r = restored._learning_rate
    assert isinstance(r, optim_lib.WarmUpAndCosine)
    assert r.get_config() == s.get_config()


class _Model(keras.Model):
    """encoder / projection_head / supervised_head with BN, bias, conv."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.Sequential(
            [
                keras.layers.Conv2D(2, 3, use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.GlobalAveragePooling2D(),
            ]
        )
        self.projection_head = keras.layers.Dense(3, use_bias=True)
        self.supervised_head = keras.layers.Dense(2)

    def call(self, x):
        h = self.encoder(x)
        return {"z": self.projection_head(h), "y": self.supervised_head(h)}


def _small_model():
    keras.utils.set_random_seed(0)
    model = _Model()
    model(tf.zeros((1, 4, 4, 1)))
    bn = model.encoder.layers[1]
    bn.gamma.assign([1.5, -2.0])  # non-zero BN parameters, excluded anyway
    bn.beta.assign([0.5, 0.25])
    model.supervised_head.bias.assign([3.0, -1.0])
    return model


def _decay_loss(model, optim):
    """The loss's weight-decay term as the objective computes it."""
    decayed = optim_lib.decayed_variables(
        optim.optimizer,
        simclr_model.weight_groups(model),
        model.trainable_variables,
    )
    return objective.weight_decay_loss(decayed, optim.weight_decay)


def _build_optimizer(optim, learning_rate, model):
    return optim_lib.build_optimizer(
        optim.optimizer,
        learning_rate,
        momentum=optim.momentum,
        weight_decay=optim.weight_decay,
        lars_exclusions=simclr_model.weight_groups(model).lars_exclusions,
    )


def _half_sq(*variables):
    return sum(0.5 * float(np.sum(v.numpy() ** 2)) for v in variables)


def test_weight_decay_loss_lars_is_supervised_kernel_only():
    model = _small_model()
    optim = config_lib.OptimConfig(optimizer="lars", weight_decay=1e-2)
    got = _decay_loss(model, optim)
    want = 1e-2 * _half_sq(model.supervised_head.kernel)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_weight_decay_loss_other_optimizers_skip_batch_norm(name):
    model = _small_model()
    optim = config_lib.OptimConfig(optimizer=name, weight_decay=1e-2)
    got = _decay_loss(model, optim)
    conv = model.encoder.layers[0]
    want = 1e-2 * _half_sq(
        conv.kernel,
        model.projection_head.kernel,
        model.projection_head.bias,
        model.supervised_head.kernel,
        model.supervised_head.bias,
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    zero = config_lib.OptimConfig(optimizer=name, weight_decay=0.0)
    assert float(_decay_loss(model, zero)) == 0.0


def test_build_optimizer():
    model = _small_model()
    base = dict(momentum=0.8, weight_decay=1e-3)
    opt = _build_optimizer(
        config_lib.OptimConfig(optimizer="lars", **base), 0.1, model
    )
    assert isinstance(opt, lars.LARS)
    assert opt.momentum == 0.8 and opt.weight_decay == 1e-3
    assert opt.eeta == 0.001 and opt.classic_momentum
    excluded = {
        id(v) for v in simclr_model.weight_groups(model).lars_exclusions
    }
    # BN gamma + beta, projection bias, supervised kernel + bias.
    assert len(excluded) == 5
    keys = {
        opt._var_key(v)
        for v in simclr_model.weight_groups(model).lars_exclusions
    }
    assert opt._no_decay_keys == keys == opt._no_adaptation_keys

    sgd = _build_optimizer(
        config_lib.OptimConfig(optimizer="momentum", **base), 0.1, model
    )
    assert isinstance(sgd, keras.optimizers.SGD)
    assert sgd.nesterov and sgd.momentum == 0.8
    adam = _build_optimizer(
        config_lib.OptimConfig(optimizer="adam", **base), 0.1, model
    )
    assert isinstance(adam, keras.optimizers.Adam)
    assert adam.weight_decay is None  # decay is in the loss


def test_weight_decay_of_the_resnet18_simclr_model():
    from simclr_tf.models import factory

    config = config_lib.from_flat(dict(resnet_depth=18, image_size=32))
    model = factory.build_model(config, num_classes=10)
    lars_vars = optim_lib.decayed_variables(
        "lars", model.weight_groups, model.trainable_variables
    )
    assert [id(v) for v in lars_vars] == [
        id(model.supervised_head.dense.kernel)
    ]
    sgd_vars = optim_lib.decayed_variables(
        "momentum", model.weight_groups, model.trainable_variables
    )
    # PARAMS.md (depth 18, image 32, 10 classes): 11,770,186 trainable
    # weights; BN gamma + beta: encoder 9,728 (= its non-trainable moving
    # statistics) and head 2 * (512 + 512) + 128 (last BN: gamma only).
    count = sum(int(np.prod(v.shape)) for v in sgd_vars)
    assert count == 11_770_186 - 9_728 - (2 * 1024 + 128)
