"""Tests of simclr_tf.data.augment against SPEC.md §2.

Statistics are estimated over N seeded draws run inside one `Dataset.map`;
tolerances are 4.5 binomial standard deviations (a false failure about once
in 150,000 runs per assertion).
"""

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.data import augment

N = 4000


def _seed(i):
    return tf.stack([tf.constant(7, tf.int64), tf.cast(i, tf.int64)])


def _draw(fn, n=N):
    """Stacks fn(seed_i) for i < n, computed in one Dataset.map: numpy."""
    ds = tf.data.Dataset.range(n).map(lambda i: fn(_seed(i)))
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(ds.batch(n))))


def _assert_rate(hits, p, name):
    hits = np.asarray(hits, bool)
    tol = 4.5 * math.sqrt(p * (1 - p) / hits.size)
    assert abs(hits.mean() - p) < tol, (name, hits.mean(), p, tol)


def _image(h=24, w=20, lo=0.0, hi=1.0, seed=1):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.uniform(lo, hi, (h, w, 3)), tf.float32)


# --------------------------------------------------------------------------
# Every op: eager == inside Dataset.map, shape, dtype, range.

_KW = dict(height=16, width=16)
OPS = {
    "crop_and_resize": lambda x, s: augment.random_crop_and_resize(
        x, seed=s, **_KW
    ),
    "flip": lambda x, s: augment.random_flip(x, seed=s),
    "color_jitter": lambda x, s: augment.color_jitter(
        x, seed=s, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2
    ),
    "color_distortion_v1": lambda x, s: augment.color_distortion(
        x, strength=1.0, seed=s, impl="v1"
    ),
    "grayscale": lambda x, s: augment.to_grayscale(x),
    "blur": lambda x, s: augment.random_blur(x, kernel_size=5, seed=s),
    "center_crop": lambda x, s: augment.center_crop(x, **_KW),
    "train": lambda x, s: augment.preprocess_for_train(x, seed=s, **_KW),
    "train_uint8": lambda x, s: augment.preprocess_for_train(
        tf.cast(x * 255, tf.uint8), seed=s, **_KW
    ),
    "eval": lambda x, s: augment.preprocess_for_eval(x, **_KW),
    "eval_small": lambda x, s: augment.preprocess_for_eval(
        x, height=8, width=8
    ),
    "views": lambda x, s: augment.pretrain_views(x, seed=s, **_KW),
}
# Ops documented as not clipping (bicubic resize can overshoot [0, 1]).
UNCLIPPED = {"crop_and_resize", "center_crop"}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_eager_and_in_dataset_map(name):
    op = OPS[name]
    image = _image()
    seed = _seed(3)
    eager = op(image, seed)
    ds = tf.data.Dataset.from_tensors(image).map(lambda x: op(x, seed))
    mapped = next(iter(ds))
    assert eager.dtype == mapped.dtype == tf.float32
    assert eager.shape == mapped.shape
    np.testing.assert_allclose(eager.numpy(), mapped.numpy(), atol=1e-6)
    if name not in UNCLIPPED:
        assert eager.numpy().min() >= 0.0 and eager.numpy().max() <= 1.0


def test_output_shapes():
    image = _image(37, 53)
    assert augment.preprocess_for_train(image, height=32, width=32).shape == (
        32,
        32,
        3,
    )
    assert augment.preprocess_for_eval(image, height=48, width=48).shape == (
        48,
        48,
        3,
    )
    views = augment.pretrain_views(image, height=16, width=16, num_views=3)
    assert views.shape == (16, 16, 9)


def test_two_views_differ_and_seed_reproduces():
    image = _image()
    views = augment.pretrain_views(image, height=16, width=16, seed=_seed(0))
    assert not np.allclose(views[..., :3], views[..., 3:])
    again = augment.pretrain_views(image, height=16, width=16, seed=_seed(0))
    np.testing.assert_array_equal(views.numpy(), again.numpy())
    other = augment.pretrain_views(image, height=16, width=16, seed=_seed(1))
    assert not np.allclose(views, other)
    # seed=None draws fresh randomness.
    a = augment.preprocess_for_train(image, height=16, width=16)
    b = augment.preprocess_for_train(image, height=16, width=16)
    assert not np.allclose(a, b)


# --------------------------------------------------------------------------
# Random crop.


def _crop_windows(shape, min_crop_area):
    def window(seed):
        return tf.stack(
            augment.distorted_crop_window(
                tf.constant(shape), seed=seed, min_crop_area=min_crop_area
            )
        )

    win = _draw(window)
    oy, ox, h, w = win.T
    assert (oy >= 0).all() and (ox >= 0).all()
    assert (oy + h <= shape[0]).all() and (ox + w <= shape[1]).all()
    return h, w, h * w / (shape[0] * shape[1])


def test_crop_area_and_aspect_ratio_distribution():
    h, w, area = _crop_windows((224, 224, 3), 0.08)
    # Area range (0.08, 1); min_object_covered=0.1 of the whole-image box
    # raises the effective lower edge to 0.1, as in the reference.
    assert area.min() >= 0.1 - 1e-6
    assert area.max() <= 1.0
    # Both edges are reached: small crops are common, near-full ones occur.
    assert area.min() < 0.102
    assert np.mean(area < 0.2) > 0.1
    assert area.max() > 0.95
    ratio = w / h
    assert (ratio >= 3 / 4 - 1 / h).all() and (ratio <= 4 / 3 + 1 / h).all()
    assert ratio.min() < 0.76 and ratio.max() > 1.32


def test_min_crop_area_raises_the_lower_edge():
    _, _, area = _crop_windows((64, 64, 3), 0.5)
    assert area.min() >= 0.5 - 1e-6
    assert area.min() < 0.52


def test_crop_of_a_constant_image_is_constant():
    colour = tf.constant([0.2, 0.5, 0.7])
    image = tf.ones([30, 40, 1]) * colour
    out = augment.random_crop_and_resize(
        image, height=16, width=16, seed=_seed(0)
    )
    np.testing.assert_allclose(out, tf.ones([16, 16, 1]) * colour, atol=1e-5)


# --------------------------------------------------------------------------
# Flip, colour distortion, blur rates.


def test_flip_rate():
    image = _image(4, 6)
    out = _draw(lambda s: augment.random_flip(image, seed=s))
    flipped = np.all(out == image.numpy()[:, ::-1], axis=(1, 2, 3))
    same = np.all(out == image.numpy(), axis=(1, 2, 3))
    assert np.all(flipped ^ same)
    _assert_rate(flipped, 0.5, "flip")


def test_jitter_and_grayscale_rates():
    image = _image(6, 6, 0.2, 0.8)
    gray_in = augment.to_grayscale(image).numpy()
    out = _draw(lambda s: augment.color_distortion(image, strength=1.0, seed=s))
    gray = np.all(
        np.abs(out - out[..., :1]) < 1e-6, axis=(1, 2, 3)
    )  # R == G == B everywhere.
    unchanged = np.where(
        gray,
        np.all(np.abs(out - gray_in) < 1e-6, axis=(1, 2, 3)),
        np.all(np.abs(out - image.numpy()) < 1e-6, axis=(1, 2, 3)),
    )
    _assert_rate(gray, augment.GRAYSCALE_PROB, "grayscale")
    _assert_rate(~unchanged, augment.COLOR_JITTER_PROB, "jitter")
    # Independent decisions: P(jitter and gray) = 0.8 x 0.2.
    _assert_rate(gray & ~unchanged, 0.16, "jitter and grayscale")


def test_blur_rate_sigma_and_kernel_size():
    size = 15
    impulse = np.zeros([size, size, 3], np.float32)
    impulse[7, 7] = 1.0
    kernel = augment.blur_kernel_size(64)  # 64 // 10 = 6 -> 7 taps
    assert kernel == 7
    out = _draw(
        lambda s: augment.random_blur(
            tf.constant(impulse), kernel_size=kernel, seed=s
        )
    )[..., 0]
    blurred = out[:, 7, 8] > 0
    _assert_rate(blurred, augment.BLUR_PROB, "blur")
    assert np.all(out[~blurred] == impulse[..., 0])
    out = out[blurred]
    # The impulse response is outer(w, w) with w_1 / w_0 = exp(-1 / 2s^2).
    ratio = out[:, 7, 8].astype(np.float64) / out[:, 7, 7]
    sigma = np.sqrt(-1.0 / (2.0 * np.log(ratio)))
    assert sigma.min() >= 0.1 - 1e-3 and sigma.max() <= 2.0 + 1e-3
    assert sigma.min() < 0.15 and sigma.max() > 1.95
    se = (1.9 / math.sqrt(12)) / math.sqrt(len(sigma))  # U(0.1, 2) mean
    assert abs(sigma.mean() - 1.05) < 4.5 * se
    # Support is the kernel: nothing beyond 3 pixels from the impulse.
    support = np.zeros_like(impulse[..., 0], bool)
    support[4:11, 4:11] = True
    assert np.all(out[:, ~support] == 0)
    wide = sigma > 1.0  # Outer taps are visible (exp(-9/2) > 0.01).
    assert np.all(out[wide][:, 7, 4] > 0) and np.all(out[wide][:, 7, 10] > 0)


@pytest.mark.parametrize(
    "image_size, taps", [(224, 23), (100, 11), (64, 7), (32, 3), (16, 1)]
)
def test_blur_kernel_size(image_size, taps):
    assert augment.blur_kernel_size(image_size) == taps


# --------------------------------------------------------------------------
# Brightness forms and jitter order.


def _brightness_only(image, impl, strength):
    return lambda s: augment.color_jitter(
        image, seed=s, brightness=0.8 * strength, impl=impl
    )


def test_v2_brightness_is_multiplicative():
    image = _image(4, 4, 0.1, 0.45)
    out = _draw(_brightness_only(image, "v2", 0.5), n=2000)
    ratio = out / image.numpy()
    factor = ratio.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(
        ratio, factor[:, None, None, None] * np.ones_like(ratio), rtol=1e-5
    )
    # factor ~ U(1 - 0.4, 1 + 0.4).
    assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5
    assert factor.min() < 0.61 and factor.max() > 1.39
    # Strength 1.5: lower end max(0, 1 - 1.2) = 0.
    factor = (
        _draw(_brightness_only(image, "v2", 1.5), n=2000) / image.numpy()
    ).mean(axis=(1, 2, 3))
    assert factor.min() >= 0 and factor.min() < 0.02


def test_v1_brightness_is_additive():
    image = _image(4, 4, 0.45, 0.55)
    out = _draw(_brightness_only(image, "v1", 0.5), n=2000)
    delta = out - image.numpy()
    shift = delta.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(
        delta, shift[:, None, None, None] * np.ones_like(delta), atol=1e-6
    )
    # delta ~ U(-0.4, 0.4); a multiplicative factor would not be constant.
    assert shift.min() >= -0.4 - 1e-6 and shift.max() <= 0.4 + 1e-6
    assert shift.min() < -0.39 and shift.max() > 0.39
    ratio = out / image.numpy()
    assert np.ptp(ratio, axis=(1, 2, 3)).max() > 0.05


def test_jitter_order_is_a_uniform_permutation():
    orders = _draw(augment.jitter_order, n=2400)
    assert np.all(np.sort(orders, axis=1) == np.arange(4))
    counts = {p: 0 for p in itertools.permutations(range(4))}
    for row in orders:
        counts[tuple(row)] += 1
    expected = len(orders) / 24
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    # 23 degrees of freedom: P(chi2 > 60) < 1e-4.
    assert min(counts.values()) > 0 and chi2 < 60, counts


def _reference_jitter(image, seed, s, order=None):
    """The documented composition, built from tf.image ops directly: the
    order from sub-seed 0 (unless given), op i's factor from sub-seed 1+i."""
    seeds = tf.random.experimental.stateless_split(seed, 5)
    lo, hi = 1 - 0.8 * s, 1 + 0.8 * s
    ops = [
        lambda x: (
            x * tf.random.stateless_uniform([], seeds[1], minval=lo, maxval=hi)
        ),
        lambda x: tf.image.stateless_random_contrast(x, lo, hi, seeds[2]),
        lambda x: tf.image.stateless_random_saturation(x, lo, hi, seeds[3]),
        lambda x: tf.image.stateless_random_hue(x, 0.2 * s, seeds[4]),
    ]
    if order is None:
        order = np.argsort(
            tf.random.stateless_uniform([4], seed=seeds[0]).numpy()
        )
    for i in order:
        image = tf.clip_by_value(ops[i](image), 0.0, 1.0)
    return image.numpy(), tuple(int(i) for i in order)


def test_color_jitter_applies_ops_in_the_random_order():
    image = _image(8, 8)
    s = 1.0
    orders, differs_from_fixed_order = set(), 0
    for i in range(40):
        seed = _seed(i)
        got = augment.color_jitter(
            image,
            seed=seed,
            brightness=0.8 * s,
            contrast=0.8 * s,
            saturation=0.8 * s,
            hue=0.2 * s,
        ).numpy()
        want, order = _reference_jitter(image, seed, s)
        np.testing.assert_allclose(got, want, atol=1e-5)
        orders.add(order)
        fixed, _ = _reference_jitter(image, seed, s, order=(0, 1, 2, 3))
        differs_from_fixed_order += not np.allclose(got, fixed, atol=1e-4)
    assert len(orders) > 10
    # The order changes the result, so a fixed order could not pass.
    assert differs_from_fixed_order > 10


# --------------------------------------------------------------------------
# Deterministic ops against hand-computed values.


def test_grayscale_weights():
    pixels = tf.constant(
        [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.25, 1.0]]]
    )
    out = augment.to_grayscale(pixels).numpy()
    # 0.2989 R + 0.5870 G + 0.1140 B; 0.14945 + 0.14675 + 0.114 = 0.4102.
    want = np.array([0.2989, 0.5870, 0.1140, 0.4102])
    np.testing.assert_allclose(out[0], np.repeat(want[:, None], 3, 1), 1e-4)


def test_gaussian_kernel_weights():
    # exp(-x^2 / 2) for x = -2..2, divided by their sum 2.48373.
    np.testing.assert_allclose(
        augment.gaussian_kernel(5, 1.0),
        [0.05448868, 0.24420134, 0.40261995, 0.24420134, 0.05448868],
        rtol=1e-5,
    )


def test_gaussian_blur_impulse_and_zero_padding():
    impulse = np.zeros([9, 9, 3], np.float32)
    impulse[4, 4] = 1.0
    out = augment.gaussian_blur(impulse, kernel_size=5, sigma=1.0).numpy()
    w = np.exp(-(np.arange(-2, 3) ** 2) / 2.0)
    w /= w.sum()
    want = np.zeros([9, 9])
    want[2:7, 2:7] = np.outer(w, w)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], want, atol=1e-7)
    # SAME zero padding: the corner of a blurred constant image keeps
    # (w_0 + w_1)^2 = (0.45186276 + 0.27406862)^2 = 0.52697637 (3 taps).
    ones = augment.gaussian_blur(tf.ones([6, 6, 3]), kernel_size=3, sigma=1.0)
    np.testing.assert_allclose(ones[0, 0], [0.52697637] * 3, rtol=1e-5)
    np.testing.assert_allclose(ones[2, 2], [1.0] * 3, rtol=1e-5)


@pytest.mark.parametrize(
    "image_hw, target_hw, want",
    [
        # rint(0.875 * 100) = 88; offsets ((100-88)+1)//2 = 6, (113)//2=56.
        ((100, 200), (224, 224), (6, 56, 88, 88)),
        ((200, 100), (224, 224), (56, 6, 88, 88)),
        ((64, 64), (56, 56), (4, 4, 56, 56)),
        # Target 2:1 is wider than the image: width-limited, 44 x 88.
        ((100, 100), (50, 100), (28, 6, 44, 88)),
    ],
)
def test_center_crop_window(image_hw, target_hw, want):
    got = augment.center_crop_window(
        *image_hw, height=target_hw[0], width=target_hw[1]
    )
    assert tuple(int(v) for v in got) == want


def test_eval_view_is_the_center_crop():
    image = _image(64, 64)
    # Crop 56 of 64 at offset 4; resizing 56 -> 56 keeps the pixels.
    out = augment.preprocess_for_eval(image, height=56, width=56)
    np.testing.assert_allclose(out, image[4:60, 4:60], atol=1e-5)
    # image_size <= 32: no crop (reference), only a resize if needed.
    small = _image(32, 32)
    out = augment.preprocess_for_eval(small, height=32, width=32)
    np.testing.assert_allclose(out, small, atol=1e-6)
    assert augment.preprocess_for_eval(
        _image(40, 50), height=16, width=16
    ).shape == (16, 16, 3)


def test_finetune_view_has_no_colour_change_or_blur():
    # A constant colour survives crop, resize and flip exactly; colour
    # distortion or blur (zero padding darkens the border) would change it.
    colour = np.array([0.2, 0.5, 0.7], np.float32)
    image = tf.constant(np.ones([40, 48, 1], np.float32) * colour)

    def view(**kw):
        return lambda s: augment.preprocess_for_train(
            image, height=32, width=32, seed=s, **kw
        )

    finetune = _draw(view(color_jitter_strength=0.0, use_blur=False), 200)
    np.testing.assert_allclose(
        finetune, np.broadcast_to(colour, finetune.shape), atol=1e-5
    )
    # With blur (3 taps at 32 px), about half the views change: p = 0.5
    # times P(sigma large enough for a visible border, ~0.9).
    blurred = _draw(view(color_jitter_strength=0.0, use_blur=True), 200)
    changed = np.abs(blurred - colour).max(axis=(1, 2, 3)) > 1e-3
    assert 0.3 < changed.mean() < 0.6
    jittered = _draw(view(color_jitter_strength=1.0, use_blur=False), 200)
    changed = np.abs(jittered - colour).max(axis=(1, 2, 3)) > 1e-3
    # Jitter (0.8) or grayscale (0.2): 1 - 0.2 x 0.8 = 0.84 change.
    _assert_rate(changed, 0.84, "colour distortion in the train view")


def test_augmentation_grid_layout():
    rng = np.random.default_rng(0)
    views = rng.uniform(size=(2, 4, 5, 6)).astype(np.float32)
    originals = rng.uniform(size=(2, 4, 5, 3)).astype(np.float32)
    grid = augment.augmentation_grid(views, originals, padding=1).numpy()
    # 2 rows of (4 + 2) pixels; 3 columns (original + 2 views) of (5 + 2).
    assert grid.shape == (1, 12, 21, 3)
    g = grid[0]
    np.testing.assert_array_equal(g[1:5, 1:6], originals[0])
    np.testing.assert_array_equal(g[1:5, 8:13], views[0, ..., :3])
    np.testing.assert_array_equal(g[7:11, 15:20], views[1, ..., 3:])
    assert np.all(g[0] == 1.0) and np.all(g[:, 7] == 1.0)
    assert augment.augmentation_grid(views, padding=1).shape == (1, 12, 14, 3)
