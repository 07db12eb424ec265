"""SavedModel export for TF Serving and TF Hub.

One export directory serves three kinds of users:

- TF Serving / `saved_model_cli`: the `serving_default` signature takes a
  batch of encoded images (`image_bytes`, JPEG/PNG/GIF/BMP/WebP strings) and
  runs the eval preprocessing of the input pipeline inside (SPEC.md §2); the
  `serving_images` signature takes float RGB images `(B, H, W, 3)` in [0, 1]
  of any size and runs the same preprocessing. Both return
  `final_avg_pool`, `proj_head_output` and, with a supervised head,
  `logits`, `probabilities` and `top_5_classes` (top min(5, classes)).
- TF Hub (the Reusable SavedModel API, what `hub.load` and `hub.KerasLayer`
  expect): the root object is callable as `obj(images, training=False)` on
  images that are already preprocessed (`(B, H, W, 3)` float32 in [0, 1]),
  traced for both `training` values, and returns the dict of named endpoints
  of the reference hub modules. `training=True` uses batch statistics and
  updates the BN moving averages, so the module can be fine-tuned. The
  reference SavedModels were called as `obj(images, trainable=False)`; that
  keyword is accepted too and means the same as `training`. The root also
  has `variables`, `trainable_variables` and `regularization_losses`.
- Everyone: `assets/simclr_metadata.json` records the architecture, image
  size, classes and step of the export (`load_metadata`).

Endpoints come from the model's output dict; nothing is looked up by graph
tensor name (DESIGN.md).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf
from absl import logging
from tensorflow.python.saved_model import save_context

import simclr_tf
from simclr_tf import config as config_lib
from simclr_tf import run_info as run_info_lib
from simclr_tf.data import augment
from simclr_tf.models import factory, resnet

SERVING_SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "serving_images"
BYTES_INPUT = "image_bytes"
IMAGES_INPUT = "images"
METADATA_FILENAME = "simclr_metadata.json"
TOP_K = 5
# Endpoints of the hub callable, in the order of the reference hub modules.
HUB_ENDPOINTS = (
    *resnet.ENDPOINTS,
    "proj_head_input",
    "proj_head_output",
    "logits_sup",
)
# Endpoints every export needs (the others are passed on when present).
REQUIRED_ENDPOINTS = ("final_avg_pool", "proj_head_input", "proj_head_output")
# Leading bytes of the formats `tf.io.decode_image` reads: (offset, magic).
_IMAGE_MAGIC = (
    (0, b"\xff\xd8\xff"),  # JPEG
    (0, b"\x89PNG"),  # PNG
    (0, b"GIF8"),  # GIF
    (0, b"BM"),  # BMP
    (8, b"WEBP"),  # WebP ("RIFF" + size + "WEBP")
)
_MAGIC_SPAN = max(offset + len(magic) for offset, magic in _IMAGE_MAGIC)


class ExportError(ValueError):
    """A model, checkpoint or directory that cannot be exported."""


# --------------------------------------------------------------------------
# The exported functions.


def _float32_endpoints(outputs: Mapping[str, tf.Tensor]) -> dict:
    return {
        key: tf.cast(outputs[key], tf.float32)
        for key in HUB_ENDPOINTS
        if key in outputs
    }


def _serving_outputs(model: keras.Model, images: tf.Tensor) -> dict:
    """The signature outputs for preprocessed images (B, S, S, 3)."""
    outputs = _float32_endpoints(model(images, training=False))
    result = {
        "final_avg_pool": outputs["final_avg_pool"],  # (B, D)
        "proj_head_output": outputs["proj_head_output"],  # (B, P)
    }
    if "logits_sup" in outputs:
        logits = outputs["logits_sup"]  # (B, C)
        k = min(TOP_K, logits.shape[-1])
        result["logits"] = logits
        result["probabilities"] = tf.nn.softmax(logits, axis=-1)
        result["top_5_classes"] = tf.math.top_k(logits, k=k).indices
    return result


def _looks_like_image(data: tf.Tensor) -> tf.Tensor:
    """True when the scalar string starts like a decodable image format."""
    # Padded, so that `substr` cannot run past the end of a short string.
    head = tf.strings.join([data, b"\0" * _MAGIC_SPAN])
    checks = [
        tf.equal(tf.strings.substr(head, offset, len(magic)), magic)
        for offset, magic in _IMAGE_MAGIC
    ]
    return tf.reduce_any(tf.stack(checks))


def _decode_and_preprocess(image_bytes: tf.Tensor, image_size: int):
    """(B,) encoded images -> (B, S, S, 3) float32, eval preprocessing.

    A string that is not an image fails with an InvalidArgumentError naming
    its index in the batch (the serving process keeps running).
    """

    def one(args):
        index, data = args
        message = tf.strings.format(
            "image_bytes[{}] ({} bytes) is not a JPEG, PNG, GIF, BMP or "
            "WebP image. Send the encoded bytes of each image file (in a "
            "JSON request, base64-encoded under the key b64).",
            (index, tf.strings.length(data)),
        )
        check = tf.debugging.Assert(_looks_like_image(data), [message])
        with tf.control_dependencies([check]):
            image = tf.io.decode_image(
                data, channels=3, dtype=tf.float32, expand_animations=False
            )
        image.set_shape([None, None, 3])
        return augment.preprocess_for_eval(
            image, height=image_size, width=image_size
        )

    indices = tf.range(tf.shape(image_bytes, out_type=tf.int64)[0])
    return tf.map_fn(
        one,
        (indices, image_bytes),
        fn_output_signature=tf.TensorSpec(
            (image_size, image_size, 3), tf.float32
        ),
    )


def _check_float_images(images: tf.Tensor) -> tf.Tensor:
    """`images` after asserting (B, H > 0, W > 0, 3) and values in [0, 1].

    A loaded signature does not check shapes itself (TF Serving neither), so
    a wrong rank or channel count would otherwise fail deep inside the
    graph. The rank is checked first, with rank-agnostic ops.
    """
    shape = tf.shape(images)
    expected = (
        f"{IMAGES_SIGNATURE} expects float32 RGB images of shape (batch, "
        "height, width, 3) with values in [0, 1]"
    )
    # Padded, so that a lower rank cannot index past the end of `shape`.
    channels = tf.pad(shape, [[0, 4]])[3]
    shape_ok = tf.logical_and(tf.equal(tf.size(shape), 4), channels == 3)
    check = tf.debugging.Assert(
        shape_ok,
        [
            tf.strings.format(
                expected + "; got shape {}. Send one batch of RGB images, or "
                f"encoded images to {SERVING_SIGNATURE}.",
                shape,
            )
        ],
    )
    with tf.control_dependencies([check]):
        values = tf.reshape(images, [-1])
    # An empty batch reduces to (+inf, -inf), which passes.
    low, high = tf.reduce_min(values), tf.reduce_max(values)
    check = tf.debugging.Assert(
        tf.reduce_all([shape[1] > 0, shape[2] > 0, low >= 0.0, high <= 1.0]),
        [
            tf.strings.format(
                expected + "; got shape {} with values in [{}, {}]. Divide "
                "8-bit pixels by 255.",
                (shape, low, high),
            )
        ],
    )
    with tf.control_dependencies([check]):
        return tf.identity(images)


def _preprocess_float_images(images: tf.Tensor, image_size: int):
    return tf.map_fn(
        lambda image: augment.preprocess_for_eval(
            image, height=image_size, width=image_size
        ),
        _check_float_images(images),
        fn_output_signature=tf.TensorSpec(
            (image_size, image_size, 3), tf.float32
        ),
    )


def _hub_call(
    model: keras.Model, options: tf.saved_model.SaveOptions
) -> tf.types.experimental.GenericFunction:
    """`obj(images, training=False)` of the Reusable SavedModel API.

    Its four variants are traced in the context `tf.saved_model.save`
    creates with `options`: `save` retraces a function that captures
    variables when its traces come from outside that context, which made
    every export trace the whole model four extra times.
    """

    @tf.function
    def call(images, training=False, trainable=None):
        # `trainable` is the reference SavedModels' name for `training`.
        mode = training if trainable is None else trainable
        return _float32_endpoints(model(images, training=mode))

    spec = tf.TensorSpec((None, None, None, 3), tf.float32, name=IMAGES_INPUT)
    with save_context.save_context(options):
        for kwargs in (
            {"training": False},
            {"training": True},
            {"trainable": False},
            {"trainable": True},
        ):
            call.get_concrete_function(spec, **kwargs)
    return call


def _signatures(model: keras.Model, image_size: int) -> dict:
    @tf.function(
        input_signature=[tf.TensorSpec((None,), tf.string, name=BYTES_INPUT)]
    )
    def serve_bytes(image_bytes):
        images = _decode_and_preprocess(image_bytes, image_size)
        return _serving_outputs(model, images)

    @tf.function(
        input_signature=[
            tf.TensorSpec((None, None, None, 3), tf.float32, name=IMAGES_INPUT)
        ]
    )
    def serve_images(images):
        images = _preprocess_float_images(images, image_size)
        return _serving_outputs(model, images)

    return {
        SERVING_SIGNATURE: serve_bytes.get_concrete_function(),
        IMAGES_SIGNATURE: serve_images.get_concrete_function(),
    }


# --------------------------------------------------------------------------
# Writing an export.


def _check_model(model: keras.Model, image_size: int) -> dict:
    """Runs the model once (building it); returns {endpoint: shape}."""
    try:
        outputs = model(
            tf.zeros((1, image_size, image_size, 3)), training=False
        )
    except Exception as e:  # A model that cannot take single-view images.
        raise ExportError(
            f"The model does not run on single-view images of shape "
            f"(1, {image_size}, {image_size}, 3): {e}. Export needs a model "
            "that accepts 3-channel input."
        ) from e
    missing = [key for key in REQUIRED_ENDPOINTS if key not in outputs]
    if missing:
        raise ExportError(
            f"The model's outputs {sorted(outputs)} lack the endpoints "
            f"{missing} that an export returns."
        )
    return {
        key: list(value.shape[1:])
        for key, value in _float32_endpoints(outputs).items()
    }


def _tf_variables(model: keras.Model) -> tuple[list, list]:
    """(all, trainable) `tf.Variable`s under the model's Keras variables.

    The export tracks these, not the Keras wrappers: a wrapper is saved as
    a copy of its variable that the graph does not read, and the TF1-style
    loader of TF Serving and `saved_model_cli run` then finds the variables
    the signatures read uninitialised. "Trainable" is
    `tf.Variable.trainable`, fixed when a variable is created (False for BN
    moving statistics and for blocks frozen by `fine_tune_after_block`), so
    `trainable_variables` agrees with the loaded variables' own flags.
    """
    variables = [v.value for v in model.variables]
    return variables, [v for v in variables if v.trainable]


def export_saved_model(
    model: keras.Model,
    export_dir: str,
    *,
    image_size: int,
    metadata: Mapping[str, Any],
) -> str:
    """Writes `model` as a SavedModel for TF Serving and TF Hub.

    Args:
      model: a SimCLR model whose call returns the dict of endpoints
        (`final_avg_pool`, `proj_head_input`, `proj_head_output`, optionally
        `logits_sup` and the encoder's block outputs) and accepts
        single-view images (B, H, W, 3).
      export_dir: the directory to write; it must not exist yet.
      image_size: the size the serving signatures preprocess images to.
      metadata: JSON-serialisable facts about the model (architecture,
        classes, step), written to `assets/simclr_metadata.json` together
        with the image size, the endpoint shapes and the signatures.

    Returns:
      `export_dir`.

    Raises:
      ExportError: `export_dir` exists, or the model cannot be exported.
    """
    if tf.io.gfile.exists(export_dir):
        raise ExportError(
            f"Received: export_dir={export_dir!r}, which already exists. "
            "Remove it or choose a new directory."
        )
    start = time.perf_counter()
    shapes = _check_model(model, image_size)
    num_classes = shapes["logits_sup"][-1] if "logits_sup" in shapes else None
    options = tf.saved_model.SaveOptions()
    root = tf.__internal__.tracking.AutoTrackable()
    root.__call__ = _hub_call(model, options)
    root.variables, root.trainable_variables = _tf_variables(model)
    # Weight decay is part of the training loss, not of the model.
    root.regularization_losses = []
    signatures = _signatures(model, image_size)
    logging.info(
        "Export: traced the hub callable and %d signatures in %.1f s.",
        len(signatures),
        time.perf_counter() - start,
    )
    info = dict(metadata)
    info.update(
        image_size=image_size,
        num_classes=num_classes,
        endpoints=shapes,
        signatures={
            name: {
                "inputs": [
                    spec.name
                    for spec in tf.nest.flatten(fn.structured_input_signature)
                ],
                "outputs": sorted(fn.structured_outputs),
            }
            for name, fn in signatures.items()
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, METADATA_FILENAME)
        with open(path, "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.write("\n")
        root.metadata_file = tf.saved_model.Asset(path)
        start = time.perf_counter()
        tf.saved_model.save(
            root, export_dir, signatures=signatures, options=options
        )
    logging.info(
        "Export: wrote %s in %.1f s.", export_dir, time.perf_counter() - start
    )
    return export_dir


def load_metadata(export_dir: str) -> dict:
    """The metadata JSON of an export (see `export_saved_model`)."""
    path = os.path.join(export_dir, "assets", METADATA_FILENAME)
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def run_metadata(
    config: config_lib.Config,
    step: int,
    class_names: list[str] | None = None,
) -> dict:
    """The metadata of an export from a training run's config."""
    flat = config_lib.to_flat(config)
    return {
        "simclr_tf_version": simclr_tf.__version__,
        "global_step": int(step),
        "train_mode": config.train.train_mode,
        "dataset": config.data.dataset,
        **{name: flat[name] for name in factory.ARCHITECTURE_FIELDS},
        "ft_proj_selector": config.model.ft_proj_selector,
        "class_names": list(class_names) if class_names else None,
        "input": "RGB float32 in [0, 1]; serving signatures take any size",
    }


def _prune_exports(base_dir: str, keep: int) -> None:
    """Keeps the `keep` newest numeric export directories (0 keeps all)."""
    steps = sorted(
        int(name.rstrip("/"))
        for name in tf.io.gfile.listdir(base_dir)
        if name.rstrip("/").isdigit()
    )
    for step in steps[:-keep] if keep > 0 else []:
        tf.io.gfile.rmtree(os.path.join(base_dir, str(step)))


def float32_copy(
    config: config_lib.Config, model: keras.Model, num_classes: int | None
) -> keras.Model:
    """`model` if it computes in float32, else a float32 copy of it.

    A run trained under a mixed-precision policy has layers that compute in
    bfloat16 or float16; an export traced from them would compute so too,
    on serving hardware that may lack those types. The copy is built by
    `factory.build_model(config, num_classes, "float32")` (the arguments
    the run built `model` with) and takes every weight of `model` (the
    variables are float32 either way).
    """
    if model.compute_dtype == "float32":
        return model
    copy = factory.build_model(config, num_classes, "float32")
    for target, source in zip(copy.weights, model.weights, strict=True):
        target.assign(source)
    return copy


def export_run(
    config: config_lib.Config, model: keras.Model, info: Any, step: int
) -> str:
    """Exports at the end of training into `<model_dir>/saved_model/<step>`.

    Replaces an export of the same step and keeps the newest
    `config.train.keep_hub_module_max` exports (0 keeps all, as in the
    reference). The export computes in float32 (`float32_copy`) whatever
    precision trained the model.

    Args:
      config: the run's config.
      model: the trained model.
      info: the dataset's `DatasetInfo` (for `class_names`, when known).
      step: the global step, the name of the export directory.

    Returns:
      The export directory.
    """
    base_dir = os.path.join(config.train.model_dir, "saved_model")
    export_dir = os.path.join(base_dir, str(int(step)))
    if tf.io.gfile.exists(export_dir):
        tf.io.gfile.rmtree(export_dir)
    metadata = run_metadata(config, step, getattr(info, "class_names", None))
    logging.info("Exporting step %d as a SavedModel.", step)
    start = time.perf_counter()
    copy = float32_copy(config, model, info.num_classes)
    if copy is not model:
        logging.info(
            "Export: float32 copy of the %s model in %.1f s.",
            model.compute_dtype,
            time.perf_counter() - start,
        )
    export_saved_model(
        copy,
        export_dir,
        image_size=config.data.image_size,
        metadata=metadata,
    )
    _prune_exports(base_dir, config.train.keep_hub_module_max)
    logging.info(
        "Exported SavedModel to %s in %.1f s.",
        export_dir,
        time.perf_counter() - start,
    )
    return export_dir


# --------------------------------------------------------------------------
# Exporting a checkpoint of a model_dir (scripts/export_saved_model.py).


def export_checkpoint(
    model_dir: str,
    export_dir: str | None = None,
    checkpoint: str | None = None,
) -> str:
    """Exports a checkpoint of a training run (see `export_saved_model`).

    Args:
      model_dir: the run's directory, holding `config.json` and checkpoints.
      export_dir: where to write; default `<model_dir>/saved_model/<step>`.
      checkpoint: a checkpoint prefix; default the latest in `model_dir`.

    Returns:
      The export directory.

    Raises:
      ExportError: no config, run_info.json or checkpoint, or a checkpoint
        that does not fit the model of the config.
    """
    config_path = os.path.join(model_dir, "config.json")
    if not tf.io.gfile.exists(config_path):
        raise ExportError(
            f"Received: model_dir={model_dir!r}, which has no config.json. "
            "Point --model_dir at the directory of a run of run.py."
        )
    with tf.io.gfile.GFile(config_path) as f:
        config = config_lib.from_flat(json.load(f))
    path = checkpoint or tf.train.latest_checkpoint(model_dir)
    if path is None:
        raise ExportError(
            f"Received: model_dir={model_dir!r}, which has no checkpoint. "
            "Train first, or pass --checkpoint=<prefix>."
        )
    try:
        info = run_info_lib.read(model_dir)
    except run_info_lib.RunInfoError as e:
        raise ExportError(str(e)) from e
    num_classes = info.num_classes
    model = factory.build_model(config, num_classes, "float32")  # Built.
    size = config.data.image_size
    status = tf.train.Checkpoint(model=model).restore(path)
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ExportError(
            f"Checkpoint {path!r} does not fit the model of {config_path} "
            f"with num_classes={num_classes}: {e}"
        ) from e
    status.expect_partial()  # The optimizer's slots are not needed.
    match = re.search(r"-(\d+)$", path)
    step = int(match.group(1)) if match else 0
    if export_dir is None:
        export_dir = os.path.join(model_dir, "saved_model", str(step))
    return export_saved_model(
        model,
        export_dir,
        image_size=size,
        metadata=run_metadata(config, step, info.class_names),
    )
