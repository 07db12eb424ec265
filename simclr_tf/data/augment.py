"""SimCLR image augmentations as pure TensorFlow ops (SPEC.md §2).

Every op takes one image `(H, W, 3)` float32 in [0, 1] and works eagerly and
inside `tf.data.Dataset.map`. Randomness is stateless: each random op takes
a `seed`, a shape-(2,) int32/int64 tensor, and gives the same output for the
same seed (`tf.random.experimental.stateless_split` derives sub-seeds). A
`seed=None` in the composed preprocessing draws a fresh random seed.

The reference is `tf2/data_util.py` of google-research/simclr; differences
are marked in comments. This module reads no config and no flags.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import tensorflow as tf

# Fraction of the shorter side kept by the eval centre crop (reference
# `CROP_PROPORTION`).
CROP_PROPORTION = 0.875
# Probabilities of the train view (SimCLR paper, Appendix A; reference
# `random_color_jitter`, `random_blur`).
COLOR_JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)
# Crop: the sampled box must cover >= 10% of the image (reference
# `min_object_covered=0.1`), so areas below 0.1 are never returned.
MIN_OBJECT_COVERED = 0.1
CROP_MAX_ATTEMPTS = 100
# Jitter op indices, in the order of the reference's `apply_transform`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
# TF's `rgb_to_grayscale` luma weights (ITU-R BT.601).
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)


def random_seed() -> tf.Tensor:
    """A fresh, nondeterministic seed of shape (2,) int64."""
    return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)


def split_seed(seed, num: int) -> list[tf.Tensor]:
    """Splits a shape-(2,) seed into `num` independent shape-(2,) seeds."""
    seeds = tf.random.experimental.stateless_split(seed, num)  # (num, 2)
    return tf.unstack(seeds, num=num)


def _uniform(seed, minval: float = 0.0, maxval: float = 1.0) -> tf.Tensor:
    return tf.random.stateless_uniform(
        [], seed=seed, minval=minval, maxval=maxval, dtype=tf.float32
    )


def random_apply(
    fn: Callable[[tf.Tensor], tf.Tensor], p: float, image, seed
) -> tf.Tensor:
    """Returns `fn(image)` with probability `p`, else `image` unchanged.

    Args:
      fn: the transform; must return a tensor of the shape and dtype of
        `image`.
      p: probability of applying `fn`.
      image: the input tensor.
      seed: shape-(2,) stateless seed of the coin flip.

    Returns:
      The transformed or the unchanged image.
    """
    return tf.cond(
        _uniform(seed) < p, lambda: fn(image), lambda: tf.identity(image)
    )


def to_float(image) -> tf.Tensor:
    """Converts an integer image to float32 in [0, 1] (floats pass through
    unchanged)."""
    return tf.image.convert_image_dtype(image, tf.float32)


# --------------------------------------------------------------------------
# Crop and flip.


def distorted_crop_window(
    image_shape, *, seed, min_crop_area: float = 0.08, aspect_ratio: float = 1
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Samples the Inception-style random crop box of SimCLR.

    `stateless_sample_distorted_bounding_box` with the whole image as box,
    `min_object_covered=0.1`, aspect ratio in (3/4, 4/3) x `aspect_ratio`,
    area fraction in (`min_crop_area`, 1), 100 attempts, falling back to the
    whole image (SPEC.md §2.1).

    Args:
      image_shape: (3,) int tensor, the (H, W, C) of the image.
      seed: shape-(2,) stateless seed.
      min_crop_area: lower end of the crop area fraction (paper: 0.08).
      aspect_ratio: target width / height of the output.

    Returns:
      (offset_y, offset_x, crop_height, crop_width), int32 scalars.
    """
    whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.cast(image_shape, tf.int32),
        bounding_boxes=whole,
        seed=seed,
        min_object_covered=MIN_OBJECT_COVERED,
        aspect_ratio_range=(3 / 4 * aspect_ratio, 4 / 3 * aspect_ratio),
        area_range=(min_crop_area, 1.0),
        max_attempts=CROP_MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[0], begin[1], size[0], size[1]


def random_crop_and_resize(
    image, *, height: int, width: int, seed, min_crop_area: float = 0.08
) -> tf.Tensor:
    """Random crop (`distorted_crop_window`), then bicubic resize.

    Returns:
      (height, width, C) float32; bicubic may overshoot [0, 1] slightly, the
      composed preprocessing clips at the end as the reference does.
    """
    oy, ox, ch, cw = distorted_crop_window(
        tf.shape(image),
        seed=seed,
        min_crop_area=min_crop_area,
        aspect_ratio=width / height,
    )
    image = tf.image.crop_to_bounding_box(image, oy, ox, ch, cw)
    return tf.image.resize(image, [height, width], method="bicubic")


def random_flip(image, *, seed) -> tf.Tensor:
    """Left-right flip with probability 0.5."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


# --------------------------------------------------------------------------
# Colour distortion.


def random_brightness(image, *, max_delta: float, impl: str, seed):
    """The two brightness forms of the reference (SPEC.md §2.3).

    Args:
      image: (H, W, 3) float32.
      max_delta: 0.8 x colour jitter strength.
      impl: 'v2' multiplies by U(max(0, 1 - max_delta), 1 + max_delta);
        'v1' adds U(-max_delta, max_delta) (`tf.image.random_brightness`).
      seed: shape-(2,) stateless seed.

    Returns:
      The adjusted image (not clipped).

    Raises:
      ValueError: unknown `impl`.
    """
    if impl == "v2":
        factor = _uniform(seed, max(0.0, 1.0 - max_delta), 1.0 + max_delta)
        return image * factor
    if impl == "v1":
        return tf.image.stateless_random_brightness(image, max_delta, seed)
    raise ValueError(f"Received: color_jitter_impl={impl!r}. Use v1 or v2.")


def jitter_order(seed) -> tf.Tensor:
    """A uniformly random permutation of the 4 jitter ops, (4,) int32."""
    return tf.argsort(tf.random.stateless_uniform([4], seed=seed))


def color_jitter(
    image,
    *,
    seed,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
    impl: str = "v2",
) -> tf.Tensor:
    """Brightness, contrast, saturation and hue in a random order.

    A strength of 0 turns that op off. The order is `jitter_order(seeds[0])`
    and op `i` (BRIGHTNESS, CONTRAST, SATURATION, HUE) draws its factor from
    `seeds[1 + i]`, where `seeds = split_seed(seed, 5)`; the image is clipped
    to [0, 1] after each op (reference `color_jitter_rand`).

    Args:
      image: (H, W, 3) float32 in [0, 1].
      seed: shape-(2,) stateless seed.
      brightness: brightness max delta (see `random_brightness`).
      contrast: factor in U(max(0, 1 - contrast), 1 + contrast).
      saturation: factor in U(max(0, 1 - saturation), 1 + saturation).
      hue: hue delta in U(-hue, hue), hue capped at 0.5 (a full turn).
      impl: brightness form, 'v1' or 'v2'.

    Returns:
      (H, W, 3) float32 in [0, 1].
    """
    seeds = split_seed(seed, 5)
    # The reference calls tf.image ops that reject lower < 0 or hue > 0.5;
    # clamping keeps strengths > 1.25 usable with the same ranges otherwise.
    ops = [
        functools.partial(
            random_brightness, max_delta=brightness, impl=impl, seed=seeds[1]
        ),
        lambda x: tf.image.stateless_random_contrast(
            x, max(0.0, 1 - contrast), 1 + contrast, seeds[2]
        ),
        lambda x: tf.image.stateless_random_saturation(
            x, max(0.0, 1 - saturation), 1 + saturation, seeds[3]
        ),
        lambda x: tf.image.stateless_random_hue(x, min(hue, 0.5), seeds[4]),
    ]
    strengths = (brightness, contrast, saturation, hue)
    ops = [
        op if s else tf.identity for op, s in zip(ops, strengths, strict=True)
    ]
    order = jitter_order(seeds[0])
    for position in range(4):
        branches = [functools.partial(op, image) for op in ops]
        image = tf.switch_case(order[position], branches)
        image = tf.clip_by_value(image, 0.0, 1.0)
    return image


def to_grayscale(image) -> tf.Tensor:
    """Luma (`LUMA_WEIGHTS`) tiled back to 3 channels: (H, W, 3)."""
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def color_distortion(
    image, *, strength: float, seed, impl: str = "v2"
) -> tf.Tensor:
    """Colour jitter with p 0.8, then grayscale with p 0.2 (SPEC.md §2.3).

    Jitter strengths are brightness, contrast and saturation 0.8 x
    `strength`, hue 0.2 x `strength` (reference `color_jitter`).

    Args:
      image: (H, W, 3) float32 in [0, 1].
      strength: colour jitter strength s (> 0).
      seed: shape-(2,) stateless seed.
      impl: brightness form, 'v1' or 'v2'.

    Returns:
      (H, W, 3) float32.
    """
    apply_seed, jitter_seed, gray_seed = split_seed(seed, 3)
    jitter = functools.partial(
        color_jitter,
        seed=jitter_seed,
        brightness=0.8 * strength,
        contrast=0.8 * strength,
        saturation=0.8 * strength,
        hue=0.2 * strength,
        impl=impl,
    )
    image = random_apply(jitter, COLOR_JITTER_PROB, image, apply_seed)
    return random_apply(to_grayscale, GRAYSCALE_PROB, image, gray_seed)


# --------------------------------------------------------------------------
# Gaussian blur.


def blur_kernel_size(image_size: int) -> int:
    """`image_size // 10` made odd as 2 (k // 2) + 1 (SPEC.md §2)."""
    return 2 * (image_size // 10 // 2) + 1


def gaussian_kernel(kernel_size: int, sigma) -> tf.Tensor:
    """Normalised 1-D Gaussian weights exp(-x^2 / 2 sigma^2), (kernel_size,).

    Args:
      kernel_size: odd number of taps, centred on x = 0.
      sigma: standard deviation (float or scalar tensor).
    """
    radius = kernel_size // 2
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    sigma = tf.cast(sigma, tf.float32)
    weights = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
    return weights / tf.reduce_sum(weights)


def gaussian_blur(image, *, kernel_size: int, sigma) -> tf.Tensor:
    """Separable Gaussian blur, depthwise conv with SAME (zero) padding.

    Args:
      image: (H, W, C) float32.
      kernel_size: odd kernel size (see `blur_kernel_size`).
      sigma: standard deviation in pixels.

    Returns:
      (H, W, C) float32 (not clipped).
    """
    weights = gaussian_kernel(kernel_size, sigma)
    channels = tf.shape(image)[-1]
    blur_h = tf.tile(tf.reshape(weights, [1, -1, 1, 1]), [1, 1, channels, 1])
    blur_v = tf.tile(tf.reshape(weights, [-1, 1, 1, 1]), [1, 1, channels, 1])
    x = image[None]  # (1, H, W, C)
    x = tf.nn.depthwise_conv2d(x, blur_h, [1, 1, 1, 1], padding="SAME")
    x = tf.nn.depthwise_conv2d(x, blur_v, [1, 1, 1, 1], padding="SAME")
    return x[0]


def random_blur(
    image, *, kernel_size: int, seed, p: float = BLUR_PROB
) -> tf.Tensor:
    """With probability `p`, Gaussian blur with sigma ~ U(0.1, 2.0).

    Unlike the reference (one sigma per batch and view, inside the model),
    sigma is drawn per image: the paper's definition (SPEC.md §2).

    Args:
      image: (H, W, C) float32.
      kernel_size: odd kernel size, `blur_kernel_size(image_size)`.
      seed: shape-(2,) stateless seed.
      p: probability of blurring.

    Returns:
      (H, W, C) float32 (not clipped).
    """
    apply_seed, sigma_seed = split_seed(seed, 2)
    sigma = _uniform(sigma_seed, *BLUR_SIGMA_RANGE)
    blur = functools.partial(
        gaussian_blur, kernel_size=kernel_size, sigma=sigma
    )
    return random_apply(blur, p, image, apply_seed)


# --------------------------------------------------------------------------
# Eval crop.


def center_crop_window(
    image_height,
    image_width,
    *,
    height: int,
    width: int,
    crop_proportion: float = CROP_PROPORTION,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """The centre crop box: `crop_proportion` of the shorter side at the
    target aspect ratio, offset `((H - h) + 1) // 2` (SPEC.md §2).

    The reference passes height / width as the aspect ratio where it means
    width / height; both are 1 for the square images used everywhere.

    Returns:
      (offset_y, offset_x, crop_height, crop_width), int32 scalars.
    """
    h = tf.cast(image_height, tf.float32)
    w = tf.cast(image_width, tf.float32)
    aspect = width / height

    def target_wider():  # Limited by the image width.
        return crop_proportion / aspect * w, crop_proportion * w

    def image_wider():  # Limited by the image height.
        return crop_proportion * h, crop_proportion * aspect * h

    crop_h, crop_w = tf.cond(aspect > w / h, target_wider, image_wider)
    crop_h = tf.cast(tf.math.rint(crop_h), tf.int32)
    crop_w = tf.cast(tf.math.rint(crop_w), tf.int32)
    offset_y = (tf.cast(image_height, tf.int32) - crop_h + 1) // 2
    offset_x = (tf.cast(image_width, tf.int32) - crop_w + 1) // 2
    return offset_y, offset_x, crop_h, crop_w


def center_crop(
    image,
    *,
    height: int,
    width: int,
    crop_proportion: float = CROP_PROPORTION,
) -> tf.Tensor:
    """Centre crop (`center_crop_window`), then bicubic resize."""
    shape = tf.shape(image)
    oy, ox, ch, cw = center_crop_window(
        shape[0],
        shape[1],
        height=height,
        width=width,
        crop_proportion=crop_proportion,
    )
    image = tf.image.crop_to_bounding_box(image, oy, ox, ch, cw)
    return tf.image.resize(image, [height, width], method="bicubic")


# --------------------------------------------------------------------------
# Composed train / eval preprocessing.


def preprocess_for_train(
    image,
    *,
    height: int,
    width: int,
    seed=None,
    color_jitter_strength: float = 1.0,
    color_jitter_impl: str = "v2",
    use_blur: bool = True,
    min_crop_area: float = 0.08,
    use_flip: bool = True,
) -> tf.Tensor:
    """One SimCLR training view (SPEC.md §2).

    Random crop + bicubic resize, flip (p 0.5), colour distortion when
    `color_jitter_strength > 0`, clip, Gaussian blur (p 0.5) when
    `use_blur`, clip. Fine-tuning passes strength 0 and `use_blur=False`.

    Args:
      image: (H, W, 3) image, uint8 or float in [0, 1], any H and W.
      height: output height.
      width: output width.
      seed: shape-(2,) stateless seed; None draws a random one.
      color_jitter_strength: s; 0 turns colour distortion off.
      color_jitter_impl: brightness form, 'v1' or 'v2'.
      use_blur: apply the random Gaussian blur.
      min_crop_area: lower end of the crop area fraction.
      use_flip: apply the random horizontal flip.

    Returns:
      (height, width, 3) float32 in [0, 1].
    """
    if seed is None:
        seed = random_seed()
    crop_seed, flip_seed, color_seed, blur_seed = split_seed(seed, 4)
    image = to_float(image)
    image = random_crop_and_resize(
        image,
        height=height,
        width=width,
        seed=crop_seed,
        min_crop_area=min_crop_area,
    )
    if use_flip:
        image = random_flip(image, seed=flip_seed)
    if color_jitter_strength > 0:
        image = color_distortion(
            image,
            strength=color_jitter_strength,
            seed=color_seed,
            impl=color_jitter_impl,
        )
    image = tf.clip_by_value(image, 0.0, 1.0)
    if use_blur:
        image = random_blur(
            image, kernel_size=blur_kernel_size(height), seed=blur_seed
        )
        image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.ensure_shape(image, [height, width, 3])


def preprocess_for_eval(
    image, *, height: int, width: int, crop: bool | None = None
) -> tf.Tensor:
    """The eval / serving view (SPEC.md §2).

    Centre crop of 0.875 and bicubic resize when `crop` (default:
    `height > 32`, the reference's rule); otherwise only a bicubic resize to
    (height, width) — a no-op for images already of that size, which is all
    the reference supports there.

    Args:
      image: (H, W, 3) image, uint8 or float in [0, 1].
      height: output height.
      width: output width.
      crop: whether to centre-crop; None chooses by `height`.

    Returns:
      (height, width, 3) float32 in [0, 1].
    """
    if crop is None:
        crop = height > 32
    image = to_float(image)
    if crop:
        image = center_crop(image, height=height, width=width)
    elif not (image.shape[0] == height and image.shape[1] == width):
        image = tf.image.resize(image, [height, width], method="bicubic")
    image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.ensure_shape(image, [height, width, 3])


def views_on_channels(
    view: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    image,
    seed,
    num_views: int,
) -> tf.Tensor:
    """`num_views` independent views of `image` concatenated on channels.

    View i is `view(image, seeds[i])`, `seeds = split_seed(seed, num_views)`:
    the one place a multi-view input (SimCLR's two views) is assembled.

    Args:
      view: (image, shape-(2,) seed) -> (height, width, 3) view.
      image: the input image.
      seed: shape-(2,) stateless seed.
      num_views: number of views.

    Returns:
      (height, width, 3 * num_views), views in seed order.
    """
    views = [view(image, s) for s in split_seed(seed, num_views)]
    return tf.concat(views, axis=-1)


def pretrain_views(
    image, *, height: int, width: int, seed=None, num_views: int = 2, **kw
) -> tf.Tensor:
    """`num_views` independent training views concatenated on channels.

    Args:
      image: (H, W, 3) image.
      height: output height.
      width: output width.
      seed: shape-(2,) stateless seed; None draws a random one.
      num_views: number of views (2 for SimCLR).
      **kw: the remaining `preprocess_for_train` arguments.

    Returns:
      (height, width, 3 * num_views) float32 in [0, 1].
    """
    if seed is None:
        seed = random_seed()

    def view(image, seed):
        return preprocess_for_train(
            image, height=height, width=width, seed=seed, **kw
        )

    return views_on_channels(view, image, seed, num_views)


def augmentation_grid(
    views, originals=None, *, padding: int = 2, pad_value: float = 1.0
) -> tf.Tensor:
    """Tiles a batch of views into one image for PNG or TensorBoard.

    Row i shows `originals[i]` (when given) followed by the 3-channel views
    stacked in `views[i]`.

    Args:
      views: (n, H, W, 3k) float in [0, 1], e.g. a pretraining batch.
      originals: optional (n, H, W, 3), shown in the first column.
      padding: pixels of border around each tile.
      pad_value: border intensity.

    Returns:
      (1, n (H + 2 padding), cols (W + 2 padding), 3) float32.
    """
    views = tf.convert_to_tensor(views, tf.float32)
    num_views = views.shape[-1] // 3
    tiles = tf.split(views, num_views, axis=-1)  # k x (n, H, W, 3)
    if originals is not None:
        tiles = [tf.cast(originals, tf.float32)] + tiles
    grid = tf.stack(tiles, axis=1)  # (n, cols, H, W, 3)
    pads = [[0, 0], [0, 0], [padding, padding], [padding, padding], [0, 0]]
    grid = tf.pad(grid, pads, constant_values=pad_value)
    grid = tf.transpose(grid, [0, 2, 1, 3, 4])  # (n, H', cols, W', 3)
    shape = tf.shape(grid)
    rows = shape[0] * shape[1]
    return tf.reshape(grid, [1, rows, len(tiles) * shape[3], 3])
