"""Gradient caching: full-batch contrastive gradients in encoder-sized chunks.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup" (2021). The contrastive loss couples every image of the batch,
but its gradient only reaches the encoder through the model outputs
(projections, logits). So:

1. Forward every chunk of images without a tape and reassemble the outputs
   of the whole batch (activations of one chunk alive at a time).
2. Compute the loss on the full batch (with cross-replica negatives, inside
   `loss_fn`) and its gradient w.r.t. the outputs - and w.r.t. variables the
   loss uses directly, such as the weight-decay term.
3. Forward each chunk again under a tape and back-propagate the cached
   output gradients: `tape.gradient(z_c, vars, output_gradients=dz_c)`,
   summing over chunks.

The result equals the plain gradient whenever the model maps each image
independently of the others in its batch. Batch normalisation in training
mode does not: its statistics are those of a chunk (per replica, or of the
same chunk index on all replicas with synchronized BN), as in "ghost batch
norm". The gradient is then exactly that of the chunked model, and each
chunk updates the moving statistics once per step (the second forward pass
is not counted: the statistics are restored in between). Random layers
(dropout) would draw new masks in the second pass; SimCLR has none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf


def _chunk_sizes(batch: int, chunk_size: int) -> list[int]:
    full, rest = divmod(batch, chunk_size)
    return [chunk_size] * full + ([rest] if rest else [])


def _rows_per_image(chunks_out: list[tf.Tensor], sizes, path: str) -> int:
    """k such that every chunk's output has k * chunk rows (views first)."""
    rows = [t.shape[0] if t.shape.rank else None for t in chunks_out]
    k = rows[0] // sizes[0] if rows[0] is not None else 0
    if k < 1 or any(r != k * b for r, b in zip(rows, sizes, strict=True)):
        raise ValueError(
            f"Model output {path!r} has leading sizes {rows} for chunks of "
            f"{sizes} images. Gradient caching needs outputs with a static "
            "number of rows that is a multiple of the chunk (one block of "
            "rows per view); set --grad_cache_chunk_size=0 for this model."
        )
    return k


def _assemble(chunks_out: list[tf.Tensor], sizes, k: int) -> tf.Tensor:
    """Chunk outputs [v1_c; v2_c] -> view-major [v1_all; v2_all]."""
    parts = [
        tf.reshape(t, [k, b, *t.shape[1:]])
        for t, b in zip(chunks_out, sizes, strict=True)
    ]  # (k, b_c, ...) each
    whole = tf.concat(parts, axis=1)  # (k, B, ...)
    return tf.reshape(whole, [k * sum(sizes), *whole.shape[2:]])


def _chunk_of(full: tf.Tensor, offset: int, size: int, k: int) -> tf.Tensor:
    """The rows of `full` (k * B, ...) that belong to one chunk's images."""
    batch = full.shape[0] // k
    views = tf.reshape(full, [k, batch, *full.shape[1:]])
    return tf.reshape(
        views[:, offset : offset + size], [k * size, *full.shape[1:]]
    )


def _state_variables(model: keras.layers.Layer) -> list:
    """Moving statistics of the batch-norm layers that update them."""
    state = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization) and (
            layer.trainable and layer.built
        ):
            state += [layer.moving_mean, layer.moving_variance]
    return state


def _after(deps: Sequence[tf.Tensor | None], value: tf.Tensor) -> tf.Tensor:
    # Orders chunk i + 1 after chunk i inside a tf.function, so that only
    # one chunk's activations are alive at a time (a no-op eagerly).
    deps = [d for d in deps if d is not None]
    with tf.control_dependencies(deps):
        return tf.identity(value)


def _loss_of(result: Any) -> tf.Tensor:
    return result[0] if isinstance(result, tuple | list) else result


def _plain_gradients(
    model, images, loss_fn, variables, loss_scale, training, output_keys
):
    with tf.GradientTape() as tape:
        outputs = _select(model(images, training=training), output_keys)
        result = loss_fn(outputs)
        scaled = _loss_of(result) * loss_scale
    return result, tape.gradient(scaled, variables)


def _select(outputs: Any, output_keys: Sequence[str] | None) -> Any:
    if output_keys is None:
        return outputs
    missing = [k for k in output_keys if k not in outputs]
    if missing:
        raise ValueError(
            f"Received: output_keys={list(output_keys)}, but the model has "
            f"no output {missing}; it returns {sorted(outputs)}."
        )
    return {k: outputs[k] for k in output_keys}


def _forward_chunks(model, images, sizes, training, output_keys):
    """Pass 1: the outputs of every chunk, without recording a tape."""
    outputs, offset, prev = [], 0, []
    for size in sizes:
        chunk = _after(prev, images[offset : offset + size])
        out = _select(model(chunk, training=training), output_keys)
        outputs.append(out)
        prev = keras.tree.flatten(out)
        offset += size
    return outputs


def _loss_and_output_grads(
    loss_fn, full_flat, structure, variables, loss_scale
):
    """Pass 2: the loss of the full batch and d loss / d outputs, vars."""
    with tf.GradientTape() as tape:
        tape.watch(full_flat)
        result = loss_fn(keras.tree.pack_sequence_as(structure, full_flat))
        scaled = _loss_of(result) * loss_scale
    grads = tape.gradient(scaled, list(full_flat) + list(variables))
    return result, grads[: len(full_flat)], grads[len(full_flat) :]


def _accumulate(total: list, new: list) -> list:
    out = []
    for t, n in zip(total, new, strict=True):
        if n is not None:
            n = tf.convert_to_tensor(n)  # IndexedSlices -> dense
        out.append(n if t is None else (t if n is None else t + n))
    return out


def _cached_outputs(model, images, sizes, training, output_keys):
    """Pass 1: full-batch outputs (flat, view-major) and rows per image."""
    chunk_outputs = _forward_chunks(model, images, sizes, training, output_keys)
    structure = chunk_outputs[0]
    # per_leaf[j] = (leaf j of chunk 0, leaf j of chunk 1, ...)
    per_leaf = list(
        zip(*(keras.tree.flatten(o) for o in chunk_outputs), strict=True)
    )
    paths = [
        "/".join(map(str, path))
        for path, _ in keras.tree.flatten_with_path(structure)
    ]
    ks = [
        _rows_per_image(list(leaf), sizes, path)
        for leaf, path in zip(per_leaf, paths, strict=True)
    ]
    full_flat = [
        _assemble(list(leaf), sizes, k)
        for leaf, k in zip(per_leaf, ks, strict=True)
    ]
    return structure, full_flat, ks


def _backprop_chunks(
    model, images, sizes, training, output_keys, output_grads, ks, variables
):
    """Pass 3: re-forward each chunk and back-propagate its cached grads.

    Returns the sum over chunks of the gradients w.r.t. `variables`.
    """
    used = [i for i, g in enumerate(output_grads) if g is not None]
    grads = [None] * len(variables)
    offset, prev = 0, list(output_grads)
    for size in sizes:
        chunk = _after(prev, images[offset : offset + size])
        with tf.GradientTape() as tape:
            out = _select(model(chunk, training=training), output_keys)
            flat = keras.tree.flatten(out)
        chunk_grads = tape.gradient(
            [flat[i] for i in used],
            variables,
            output_gradients=[
                _chunk_of(output_grads[i], offset, size, ks[i]) for i in used
            ],
        )
        grads = _accumulate(grads, chunk_grads)
        prev = grads
        offset += size
    return grads


def grad_cache_gradients(
    model: keras.Model,
    images: tf.Tensor,
    loss_fn: Callable[[Any], Any],
    *,
    chunk_size: int,
    variables: Sequence | None = None,
    loss_scale: float | tf.Tensor = 1.0,
    training: bool = True,
    output_keys: Sequence[str] | None = None,
) -> tuple[Any, list]:
    """Gradients of `loss_fn(model(images))` computed chunk by chunk.

    Works eagerly, inside `tf.function` and inside `strategy.run` (the
    collectives of `loss_fn` run once, on the full local batch).

    Args:
      model: maps a batch of b images to a (nested) dict of outputs whose
        leading dimension is k * b, view-major (k = 2 for two-view
        pretraining input (b, H, W, 6), 1 otherwise).
      images: (B, ...) this replica's batch; B must be static.
      loss_fn: maps the outputs of the whole batch (as `model(images)`
        would return them) to the loss, or to a tuple whose first element
        is the loss (the rest, e.g. metrics, is passed through). It may use
        variables directly (e.g. weight decay); their gradient is included.
      chunk_size: images per chunk (> 0); the last chunk may be smaller.
      variables: the variables to differentiate (default: the model's
        trainable variables).
      loss_scale: factor applied to the loss before differentiation (e.g.
        1 / num_replicas); the returned loss is unscaled.
      training: passed to the model.
      output_keys: the model outputs (keys of its dict) that `loss_fn`
        reads; only these are kept for the whole batch and passed to
        `loss_fn`. None keeps every output, which for a ResNet with its
        feature-map endpoints costs full-batch activation memory: pass
        e.g. ("proj_head_output", "logits_sup").

    Returns:
      (loss_fn's result on the full batch, gradients aligned with
      `variables`, None where the loss does not depend on a variable).

    Raises:
      ValueError: chunk_size <= 0, a dynamic batch size, an unknown output
        key, or a model output whose rows do not follow the images.
    """
    if chunk_size <= 0:
        raise ValueError(
            f"Received: chunk_size={chunk_size}. Use a positive number of "
            "images per chunk (or turn gradient caching off)."
        )
    variables = list(
        model.trainable_variables if variables is None else variables
    )
    batch = images.shape[0]
    if batch is None:
        raise ValueError(
            f"Received images of shape {images.shape}. Gradient caching "
            "needs a static batch size (batch with drop_remainder=True)."
        )
    if chunk_size >= batch:
        return _plain_gradients(
            model, images, loss_fn, variables, loss_scale, training, output_keys
        )
    sizes = _chunk_sizes(batch, chunk_size)
    state = _state_variables(model) if training else []
    saved = [tf.identity(v) for v in state]
    structure, full_flat, ks = _cached_outputs(
        model, images, sizes, training, output_keys
    )
    result, output_grads, grads = _loss_and_output_grads(
        loss_fn, full_flat, structure, variables, loss_scale
    )
    if all(g is None for g in output_grads):
        return result, grads
    # The second pass must leave the moving statistics as the first did.
    for v, value in zip(state, saved, strict=True):
        v.assign(value)
    chunk_grads = _backprop_chunks(
        model, images, sizes, training, output_keys, output_grads, ks, variables
    )
    return result, _accumulate(grads, chunk_grads)
