"""Tests of simclr_tf/export.py and scripts/export_saved_model.py.

A ResNet-18 fine-tuning model (32x32 images, 3 classes) is trained for two
SGD steps and checkpointed like a run; the export script turns the
checkpoint into a SavedModel, which a fresh Python process loads and uses
the ways README.md "Serving and TF Hub" documents. The in-process Keras
model is the reference for every output.
"""

import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf import config as config_lib
from simclr_tf import export, run_info
from simclr_tf.data import augment
from simclr_tf.models import factory

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
CLASSES = 3
STEP = 2
TOL = dict(rtol=1e-5, atol=1e-5)
SAVED_MODEL_CLI = Path(sys.executable).parent / "saved_model_cli"


def _config(model_dir: str, train_mode: str = "finetune") -> config_lib.Config:
    return config_lib.Config(
        data=config_lib.DataConfig(dataset="export_test", image_size=SIZE),
        model=config_lib.ModelConfig(resnet_depth=18),
        train=config_lib.TrainConfig(
            train_mode=train_mode, model_dir=model_dir, keep_hub_module_max=1
        ),
    )


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _run_info(num_classes):
    """The run_info.json a run of `_config` on a labelled set writes."""
    return run_info.RunInfo(
        num_classes=num_classes,
        class_names=None,
        num_train_examples=8,
        num_eval_examples=8,
        dtype_policy="float32",
        total_steps=STEP,
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _reference(model, images: list[np.ndarray]) -> dict:
    """Keras model outputs after the eval preprocessing of each image."""
    batch = tf.stack(
        [
            augment.preprocess_for_eval(
                tf.constant(image), height=SIZE, width=SIZE
            )
            for image in images
        ]
    )
    return {k: v.numpy() for k, v in model(batch, training=False).items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained, checkpointed fine-tuning run and its export by the script."""
    root = tmp_path_factory.mktemp("export")
    model_dir = str(root / "run")
    config = _config(model_dir)
    model = factory.build_model(config, CLASSES)
    optimizer = keras.optimizers.SGD(0.05)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, SIZE, SIZE, 3)).astype("float32")
    y = np.arange(8) % CLASSES
    for _ in range(STEP):  # Moves BN statistics and the zero-init gammas.
        with tf.GradientTape() as tape:
            logits = model(x, training=True)["logits_sup"]
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
            )
        grads = tape.gradient(loss, model.trainable_variables)
        # The projection head does not feed logits_sup: no gradient.
        optimizer.apply_gradients(
            (g, v)
            for g, v in zip(grads, model.trainable_variables, strict=True)
            if g is not None
        )
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    tf.train.CheckpointManager(checkpoint, model_dir, 1).save(STEP)
    config_lib.write_json(config, model_dir)
    run_info.write(_run_info(CLASSES), model_dir)
    export_dir = str(root / "export")
    _run(
        [
            sys.executable,
            "scripts/export_saved_model.py",
            f"--model_dir={model_dir}",
            f"--export_dir={export_dir}",
        ]
    )
    return types.SimpleNamespace(
        root=root, config=config, model=model, export_dir=export_dir
    )


# The consumer: a fresh process that loads the export as users do.
_CONSUMER = r"""
import base64, json, sys
import keras, numpy as np, tensorflow as tf

export_dir, inputs_path, out_path = sys.argv[1:]
inp = np.load(inputs_path)
pngs = [inp["png0"].tobytes(), inp["png1"].tobytes()]
obj = tf.saved_model.load(export_dir)
out, info = {}, {}

def save(prefix, result):
    for key, value in result.items():
        out[f"{prefix}/{key}"] = value.numpy()

save("hub", obj(inp["x"]))
save("hub_trainable_false", obj(inp["x"], trainable=False))
serve = obj.signatures["serving_default"]
save("bytes", serve(image_bytes=tf.constant(pngs)))
images_fn = obj.signatures["serving_images"]
save("images", images_fn(images=tf.constant(inp["raw"])))

def error(fn, **kwargs):
    try:
        fn(**kwargs)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"

info["errors"] = {
    "bytes": error(serve, image_bytes=tf.constant([pngs[0], b"not an image"])),
    "uint8": error(images_fn, images=tf.zeros((2, 32, 32, 3), tf.uint8)),
    "channels": error(images_fn, images=tf.zeros((2, 32, 32, 1))),
    "range": error(images_fn, images=tf.fill((2, 32, 32, 3), 255.0)),
}

# TF Serving REST, as the README's curl request sends it: the server
# base64-decodes {"b64": ...} into the named string input of the signature.
body = json.loads(inp["rest_body"].tobytes())
assert body["signature_name"] == "serving_default"
feed = [base64.b64decode(i["image_bytes"]["b64"]) for i in body["instances"]]
save("rest", serve(image_bytes=tf.constant(feed)))
# TF Serving gRPC: the PredictRequest of the README, when the API is here.
try:
    from tensorflow_serving.apis import predict_pb2
except ImportError:
    info["grpc"] = "tensorflow-serving-api not installed"
else:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "simclr"
    request.model_spec.signature_name = "serving_default"
    request.inputs["image_bytes"].CopyFrom(
        tf.make_tensor_proto(pngs, shape=[len(pngs)]))
    request = predict_pb2.PredictRequest.FromString(
        request.SerializeToString())
    fn = obj.signatures[request.model_spec.signature_name]
    save("grpc", fn(**{k: tf.constant(tf.make_ndarray(v))
                        for k, v in request.inputs.items()}))
    info["grpc"] = "ok"

# A linear classifier on the frozen export inside a new Keras 3 model.
layer = keras.layers.TFSMLayer(
    export_dir, call_endpoint="serving_images", trainable=False)
images = keras.Input((32, 32, 3))
head = keras.layers.Dense(3)
classifier = keras.Model(images, head(layer(images)["final_avg_pool"]))
classifier.compile(
    keras.optimizers.SGD(0.5),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True))
frozen = [w.numpy() for w in layer.weights]
history = classifier.fit(inp["x"], inp["y"], epochs=3, batch_size=8, verbose=0)
info["tfsm_losses"] = history.history["loss"]
info["tfsm_frozen_unchanged"] = all(
    np.array_equal(a, w.numpy()) for a, w in zip(frozen, layer.weights))
info["tfsm_head_trainable"] = len(classifier.trainable_weights)

# Fine-tuning through the module: one SGD step in training mode.
def loss_fn():
    logits = obj(inp["x"], trainable=True)["logits_sup"]
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        inp["y"], logits))

variables = obj.trainable_variables
info["trainable_flags"] = [v.trainable for v in variables]
info["num_variables"] = [len(obj.variables), len(variables)]
info["regularization_losses"] = len(obj.regularization_losses)
stats = [v for v in obj.variables if not v.trainable]
stats_before = [v.numpy() for v in stats]
with tf.GradientTape() as tape:
    loss_before = loss_fn()
grads = tape.gradient(loss_before, variables)
weights_before = [v.numpy() for v in variables]
for v, g in zip(variables, grads):
    if g is not None:
        v.assign_sub(0.01 * g)
info["loss_before"] = float(loss_before)
info["loss_after"] = float(loss_fn())
info["changed"] = [
    not np.array_equal(w, v.numpy()) for w, v in zip(weights_before, variables)]
info["with_grad"] = [
    g is not None and bool(tf.reduce_any(g != 0)) for g in grads]
info["stats_changed"] = sum(
    not np.array_equal(a, v.numpy()) for a, v in zip(stats_before, stats))
np.savez(out_path, **out)
with open(out_path + ".json", "w") as f:
    json.dump(info, f)
"""


@pytest.fixture(scope="module")
def consumer(run):
    """Inputs, and the results of the consumer process on the export."""
    rng = np.random.default_rng(1)
    pixels = [
        rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8),
        rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8),
    ]
    pngs = [_png(p) for p in pixels]
    rest_body = json.dumps(
        {
            "signature_name": "serving_default",
            "instances": [
                {"image_bytes": {"b64": base64.b64encode(p).decode()}}
                for p in pngs
            ],
        }
    )
    inputs = dict(
        x=rng.uniform(size=(8, SIZE, SIZE, 3)).astype("float32"),
        y=np.arange(8) % CLASSES,
        raw=rng.uniform(size=(2, 40, 36, 3)).astype("float32"),
        png0=np.frombuffer(pngs[0], np.uint8),
        png1=np.frombuffer(pngs[1], np.uint8),
        rest_body=np.frombuffer(rest_body.encode(), np.uint8),
    )
    inputs_path = str(run.root / "inputs.npz")
    np.savez(inputs_path, **inputs)
    script = run.root / "consumer.py"
    script.write_text(_CONSUMER)
    out_path = str(run.root / "consumer_out.npz")
    _run([sys.executable, str(script), run.export_dir, inputs_path, out_path])
    with open(out_path + ".json") as f:
        info = json.load(f)
    return types.SimpleNamespace(
        inputs=inputs, pixels=pixels, out=dict(np.load(out_path)), info=info
    )


def _check_serving(out: dict, prefix: str, reference: dict) -> None:
    logits = reference["logits_sup"]
    np.testing.assert_allclose(out[f"{prefix}/logits"], logits, **TOL)
    np.testing.assert_allclose(
        out[f"{prefix}/probabilities"], _softmax(logits), **TOL
    )
    np.testing.assert_array_equal(
        out[f"{prefix}/top_5_classes"],
        np.argsort(-logits, axis=-1, kind="stable")[:, : min(5, CLASSES)],
    )
    for key in ("final_avg_pool", "proj_head_output"):
        np.testing.assert_allclose(
            out[f"{prefix}/{key}"], reference[key], **TOL
        )


@pytest.mark.slow
def test_hub_callable_matches_keras_model(run, consumer):
    reference = {
        k: v.numpy()
        for k, v in run.model(consumer.inputs["x"], training=False).items()
    }
    expected = set(export.HUB_ENDPOINTS) & set(reference)
    assert "logits_sup" in expected and "block_group4" in expected
    for prefix in ("hub", "hub_trainable_false"):
        got = {
            k.split("/", 1)[1]: v
            for k, v in consumer.out.items()
            if k.startswith(prefix + "/")
        }
        assert set(got) == expected
        for key in expected:
            np.testing.assert_allclose(got[key], reference[key], **TOL)


@pytest.mark.slow
def test_serving_signatures_match_keras_model(run, consumer):
    decoded = [p.astype("float32") / 255.0 for p in consumer.pixels]
    for prefix in ("bytes", "rest"):
        _check_serving(consumer.out, prefix, _reference(run.model, decoded))
    raw = list(consumer.inputs["raw"])
    _check_serving(consumer.out, "images", _reference(run.model, raw))
    if consumer.info["grpc"] == "ok":
        _check_serving(consumer.out, "grpc", _reference(run.model, decoded))


@pytest.mark.slow
def test_bad_inputs_get_clear_errors(consumer):
    errors = consumer.info["errors"]
    assert "image_bytes[1] (12 bytes) is not a JPEG, PNG" in errors["bytes"]
    assert "InvalidArgumentError" in errors["bytes"]
    assert "float" in errors["uint8"] and "uint8" in errors["uint8"]
    assert "(batch, height, width, 3)" in errors["channels"]
    assert "got shape [2 32 32 1]" in errors["channels"]
    assert "Divide 8-bit pixels by 255" in errors["range"]


@pytest.mark.slow
def test_finetuning_through_loaded_module(run, consumer):
    info = consumer.info
    assert info["num_variables"] == [
        len(run.model.variables),
        len(run.model.trainable_variables),
    ]
    assert all(info["trainable_flags"])
    assert info["regularization_losses"] == 0
    assert info["loss_after"] < info["loss_before"]
    # Encoder and supervised head get non-zero gradients (the projection
    # head does not feed logits_sup when fine-tuning); they moved, except
    # where 0.01 * gradient is below float32 resolution (gammas near 1).
    changed, with_grad = info["changed"], info["with_grad"]
    assert sum(changed) > len(changed) // 2
    assert not any(c and not g for c, g in zip(changed, with_grad, strict=True))
    # training=True updated the BN moving statistics.
    assert info["stats_changed"] > 0


@pytest.mark.slow
def test_tfsm_layer_trains_a_linear_head(consumer):
    losses = consumer.info["tfsm_losses"]
    assert losses[-1] < losses[0]
    assert consumer.info["tfsm_frozen_unchanged"]
    assert consumer.info["tfsm_head_trainable"] == 2  # Dense kernel + bias.


@pytest.mark.slow
def test_saved_model_cli_show_lists_documented_signatures(run):
    shown = _run(
        [str(SAVED_MODEL_CLI), "show", "--dir", run.export_dir, "--all"]
    ).stdout
    default = shown.split("signature_def['serving_default']:")[1]
    default = default.split("signature_def[")[0]
    assert (
        "inputs['image_bytes'] tensor_info:\n        dtype: DT_STRING\n"
        "        shape: (-1)" in default
    )
    feature_dim = run.model.encoder.output_dim
    for key, dtype, shape in (
        ("final_avg_pool", "DT_FLOAT", f"(-1, {feature_dim})"),
        ("proj_head_output", "DT_FLOAT", "(-1, 128)"),
        ("logits", "DT_FLOAT", f"(-1, {CLASSES})"),
        ("probabilities", "DT_FLOAT", f"(-1, {CLASSES})"),
        ("top_5_classes", "DT_INT32", f"(-1, {CLASSES})"),
    ):
        assert (
            f"outputs['{key}'] tensor_info:\n        dtype: {dtype}\n"
            f"        shape: {shape}\n" in default
        ), key
    assert "signature_def['serving_images']" in shown
    assert (
        "inputs['images'] tensor_info:\n        dtype: DT_FLOAT\n"
        "        shape: (-1, -1, -1, 3)" in shown
    )


@pytest.mark.slow
def test_saved_model_cli_run_on_a_png(run, tmp_path):
    pixels = np.random.default_rng(2).integers(
        0, 256, size=(36, 44, 3), dtype=np.uint8
    )
    np.save(tmp_path / "image.npy", np.array([_png(pixels)]))
    _run(
        [
            str(SAVED_MODEL_CLI),
            "run",
            "--dir",
            run.export_dir,
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"image_bytes={tmp_path / 'image.npy'}",
            "--outdir",
            str(tmp_path / "out"),
        ]
    )
    out = {
        f"cli/{p.stem}": np.load(p) for p in (tmp_path / "out").glob("*.npy")
    }
    reference = _reference(run.model, [pixels.astype("float32") / 255.0])
    _check_serving(out, "cli", reference)


@pytest.mark.slow
def test_metadata_records_the_architecture(run):
    metadata = export.load_metadata(run.export_dir)
    assert metadata["resnet_depth"] == 18
    assert metadata["width_multiplier"] == 1
    assert metadata["sk_ratio"] == 0.0
    assert metadata["image_size"] == SIZE
    assert metadata["num_classes"] == CLASSES
    assert metadata["global_step"] == STEP
    assert metadata["proj_head_mode"] == "nonlinear"
    assert metadata["endpoints"]["final_avg_pool"] == [512]
    assert metadata["signatures"]["serving_default"] == {
        "inputs": ["image_bytes"],
        "outputs": [
            "final_avg_pool",
            "logits",
            "probabilities",
            "proj_head_output",
            "top_5_classes",
        ],
    }


def test_export_run_writes_step_dir_and_keeps_newest(tmp_path, monkeypatch):
    # export_saved_model itself is tested through the script above; here a
    # stand-in records its arguments and writes a file, so the directory
    # handling is checked without a second ResNet export.
    calls = []

    def fake_export(model, export_dir, *, image_size, metadata):
        calls.append((model, export_dir, image_size, metadata))
        os.makedirs(export_dir)
        Path(export_dir, "saved_model.pb").write_text("stand-in")
        return export_dir

    monkeypatch.setattr(export, "export_saved_model", fake_export)
    base = tmp_path / "saved_model"
    for old in ("3", "4", "partial"):
        (base / old).mkdir(parents=True)
    (base / "7").mkdir()
    (base / "7" / "stale").write_text("from an earlier export")
    info = types.SimpleNamespace(
        num_train_examples=8,
        num_eval_examples=8,
        num_classes=CLASSES,
        class_names=["a", "b", "c"],
    )
    model = types.SimpleNamespace(compute_dtype="float32")
    path = export.export_run(_config(str(tmp_path)), model, info, 7)
    assert path == str(base / "7")
    # keep_hub_module_max=1: only the newest numeric export stays.
    assert sorted(p.name for p in base.iterdir()) == ["7", "partial"]
    assert sorted(p.name for p in (base / "7").iterdir()) == ["saved_model.pb"]
    ((got_model, got_dir, image_size, metadata),) = calls
    assert got_model is model and got_dir == path and image_size == SIZE
    assert metadata["class_names"] == ["a", "b", "c"]
    assert metadata["global_step"] == 7
    assert metadata["resnet_depth"] == 18


def test_export_run_with_keep_zero_keeps_every_export(tmp_path, monkeypatch):
    def fake_export(model, export_dir, *, image_size, metadata):
        os.makedirs(export_dir)
        return export_dir

    monkeypatch.setattr(export, "export_saved_model", fake_export)
    config = config_lib.replace(_config(str(tmp_path)), keep_hub_module_max=0)
    info = types.SimpleNamespace(num_classes=CLASSES, class_names=None)
    model = types.SimpleNamespace(compute_dtype="float32")
    for step in (2, 4, 6):
        export.export_run(config, model, info, step)
    base = tmp_path / "saved_model"
    assert sorted(p.name for p in base.iterdir()) == ["2", "4", "6"]


def test_export_of_a_bfloat16_run_computes_in_float32(tmp_path):
    config = _config(str(tmp_path))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = factory.build_model(config, CLASSES)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    images = tf.random.uniform((2, SIZE, SIZE, 3), seed=1)
    bf16_out = model(images, training=False)
    copy = export.float32_copy(config, model, CLASSES)
    assert copy is not model and model.compute_dtype == "bfloat16"
    assert {layer.compute_dtype for layer in copy._flatten_layers()} == {
        "float32"
    }
    for a, b in zip(copy.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Same function up to bfloat16 rounding (8 significant bits).
    f32_out = copy(images, training=False)
    for key in ("final_avg_pool", "logits_sup"):
        np.testing.assert_allclose(
            f32_out[key], bf16_out[key], rtol=0.05, atol=0.05
        )
    # The exported serving graph holds no bfloat16 tensor.
    info = types.SimpleNamespace(num_classes=CLASSES, class_names=None)
    path = export.export_run(config, model, info, 1)
    loaded = tf.saved_model.load(path)
    graph = loaded.signatures["serving_images"].graph
    dtypes = {t.dtype for op in graph.get_operations() for t in op.outputs}
    for function in graph.as_graph_def().library.function:
        dtypes |= {
            tf.as_dtype(v.type)
            for node in function.node_def
            for k, v in node.attr.items()
            if k in ("T", "DstT", "SrcT", "dtype") and v.type
        }
    assert tf.float32 in dtypes and tf.bfloat16 not in dtypes


def test_export_checkpoint_needs_run_info_and_reads_its_classes(tmp_path):
    config = _config(str(tmp_path), train_mode="pretrain")
    model = factory.build_model(config, None)
    tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    config_lib.write_json(config, str(tmp_path))
    with pytest.raises(export.ExportError, match="has no run_info.json"):
        export.export_checkpoint(str(tmp_path))
    # A pretraining run on unlabelled data: no classes, no head.
    run_info.write(_run_info(None), str(tmp_path))
    assert run_info.read(str(tmp_path)).num_classes is None


def test_export_checkpoint_needs_a_run_directory(tmp_path):
    with pytest.raises(export.ExportError, match="has no config.json"):
        export.export_checkpoint(str(tmp_path))
    config_lib.write_json(_config(str(tmp_path)), str(tmp_path))
    with pytest.raises(export.ExportError, match="has no checkpoint"):
        export.export_checkpoint(str(tmp_path))


def test_export_refuses_existing_directory(tmp_path):
    with pytest.raises(export.ExportError, match="already exists"):
        export.export_saved_model(
            keras.Sequential(), str(tmp_path), image_size=SIZE, metadata={}
        )


_HUB_CONSUMER = r"""
import json, sys
import numpy as np, tensorflow as tf, tensorflow_hub as hub, tf_keras

export_dir, inputs_path, out_path = sys.argv[1:]
inp = np.load(inputs_path)
x, y = inp["x"], inp["y"]
outputs = hub.load(export_dir)(x)
np.savez(out_path, **{k: v.numpy() for k, v in outputs.items()})
info = {}

def fit(layer, head):
    model = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), layer, *head])
    model.compile(
        tf_keras.optimizers.SGD(0.01),
        tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [w.numpy() for w in layer.weights]
    losses = model.fit(x, y, epochs=2, batch_size=8, verbose=0).history["loss"]
    changed = [not np.array_equal(b, w.numpy())
               for b, w in zip(before, layer.weights)]
    return losses, changed, len(layer.trainable_weights)

# Fine-tuning: the whole module trains, BN statistics update.
info["finetune"] = fit(
    hub.KerasLayer(export_dir, trainable=True, output_key="logits_sup"), [])
# Feature extraction: a frozen module under a new linear head.
info["frozen"] = fit(
    hub.KerasLayer(export_dir, output_key="final_avg_pool"),
    [tf_keras.layers.Dense(3)])
with open(out_path + ".json", "w") as f:
    json.dump(info, f)
"""


@pytest.mark.slow
def test_tensorflow_hub_load_and_keras_layer(run, consumer):
    for module in ("tensorflow_hub", "tf_keras"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(
                f"{module} is not installed: TF Hub loading is tested with "
                "the optional extra, pip install -e '.[hub]'."
            )
    script = run.root / "hub_consumer.py"
    script.write_text(_HUB_CONSUMER)
    out_path = str(run.root / "hub_out.npz")
    inputs_path = str(run.root / "inputs.npz")
    _run([sys.executable, str(script), run.export_dir, inputs_path, out_path])
    reference = run.model(consumer.inputs["x"], training=False)
    got = np.load(out_path)
    for key in ("final_avg_pool", "proj_head_output", "logits_sup"):
        np.testing.assert_allclose(got[key], reference[key].numpy(), **TOL)
    with open(out_path + ".json") as f:
        info = json.load(f)
    losses, changed, trainable = info["finetune"]
    assert losses[-1] < losses[0]
    assert trainable == len(run.model.trainable_variables)
    # Weights moved and, through training=True, BN statistics too (the
    # layer lists trainable weights first, then the statistics).
    assert sum(changed[:trainable]) > trainable // 2
    assert any(changed[trainable:])
    losses, changed, trainable = info["frozen"]
    assert losses[-1] < losses[0]
    assert trainable == 0 and not any(changed)


_GRADIENT_CONSUMER = r"""
import sys
import numpy as np, tensorflow as tf

export_dir, inputs_path, out_path = sys.argv[1:]
inp = np.load(inputs_path)
obj = tf.saved_model.load(export_dir)
with tf.GradientTape() as tape:
    out = obj(inp["x"], training=True)
    loss = tf.reduce_sum(out["proj_head_output"] * inp["w"])
grads = tape.gradient(loss, obj.trainable_variables)
np.savez(out_path, *[g.numpy() for g in grads])
"""


@pytest.mark.slow
def test_loaded_export_has_saved_gradients(tmp_path):
    # The projection head's BN is synchronised (global_bn); Keras's
    # synchronised moments used to put unsaveable nested custom gradients
    # into the export, and each load warned that gradients would fail.
    config = _config(str(tmp_path), train_mode="pretrain")
    model = factory.build_model(config, None)
    export_dir = str(tmp_path / "export")
    export.export_saved_model(model, export_dir, image_size=SIZE, metadata={})
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(4, SIZE, SIZE, 3)).astype("float32")
    w = rng.normal(size=(4, config.model.proj_out_dim)).astype("float32")
    inputs_path = str(tmp_path / "inputs.npz")
    np.savez(inputs_path, x=x, w=w)
    script = tmp_path / "gradients.py"
    script.write_text(_GRADIENT_CONSUMER)
    out_path = str(tmp_path / "grads.npz")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(script), export_dir, inputs_path, out_path],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "custom gradient" not in result.stderr
    # The same loss on the in-memory model (batch statistics, as the
    # loaded module computes with training=True).
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = tf.reduce_sum(tf.cast(out["proj_head_output"], tf.float32) * w)
    expected = tape.gradient(loss, model.trainable_variables)
    loaded = np.load(out_path)
    got = [loaded[f"arr_{i}"] for i in range(len(loaded.files))]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        # Float32 sums over whole batches in another op order: each tensor
        # agrees to 1e-4 of its own largest entry.
        scale = float(np.abs(e.numpy()).max())
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-4 * scale)
