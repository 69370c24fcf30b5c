#!/usr/bin/env python3
"""Make Outpost's sample models from scikit-learn's bundled digits data.

Run from the repository root:  python3 models/make_models.py

Everything is deterministic (fixed seeds, pinned packages in requirements.txt). It writes, next
to this file:
  <name>.onnx           the model
  <name>.golden.json    golden inputs and the outputs ONNX Runtime (Python) gives for them;
                        outpost checks a model against these at load time
  digits-test.csv       the held-out labelled split (label, then 64 pixel values 0..16)
  SHA256SUMS            sha256 of every model and data file
  README.md             the model card, with the measured accuracies
and, under hazards/, models that are deliberately in a form some backends get wrong (tests use
them to check that outpost refuses them rather than serving wrong answers); under successors/,
later versions of digits-edge (a retrained head, one layer re-quantized, a full retrain), each
with its golden file, to measure delta updates against the original.

Every model takes raw pixel intensities (0..16, FP32) so a client can send the digits data as is:
the MLPs take `input` [batch, 64], the CNNs take `input` [batch, 1, 8, 8]; every model answers
`probabilities` [batch, 10] (softmax over the ten digits).
"""

import copy
import hashlib
import json
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
OPSET = 17
GOLDEN_SAMPLES = 16
# Probabilities from outpost must match ONNX Runtime's within this (max absolute difference).
GOLDEN_TOLERANCE = 1e-4
# The digits data are 0..16; fold the scaling into the first layer so clients send raw pixels.
PIXEL_MAX = 16.0
# Successors of digits-edge. A head fine-tune of this many epochs moves most of the head's INT8
# weights (its scale changes) while the hidden layer stays bit-for-bit the same.
HEAD_EPOCHS = 50
# The full retrain only changes the seed: the edge MLP converges well before max_iter, so more
# iterations alone would give the same weights.
RETRAIN_SEED = SEED + 1


def load_split():
    digits = load_digits()
    x = digits.data.astype(np.float32)  # (1797, 64), values 0..16
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)


# ---------------------------------------------------------------------------------------------
# Float models, written as plain ONNX graphs from trained weights.


def mlp_graph(name, mlp, in_dim):
    """An sklearn MLPClassifier (ReLU hidden layers) as MatMul/Add/Relu ... Softmax."""
    nodes, inits = [], []
    prev = "input"
    layers = list(zip(mlp.coefs_, mlp.intercepts_))
    for i, (w, b) in enumerate(layers):
        w = w.astype(np.float32)
        if i == 0:
            w = w / PIXEL_MAX
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"),
                  numpy_helper.from_array(b.astype(np.float32), f"fc{i}.bias")]
        nodes.append(helper.make_node("MatMul", [prev, f"fc{i}.weight"], [f"fc{i}.mm"], name=f"fc{i}_matmul"))
        out = f"fc{i}.out" if i < len(layers) - 1 else "logits"
        nodes.append(helper.make_node("Add", [f"fc{i}.mm", f"fc{i}.bias"], [out], name=f"fc{i}_add"))
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"fc{i}.relu"], name=f"fc{i}_relu"))
            prev = f"fc{i}.relu"
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"))
    return finish_graph(name, nodes, inits, ["batch", in_dim])


def finetune_head(mlp, x, y, epochs, seed):
    """A copy of `mlp` whose last layer has had `epochs` more epochs of sklearn's own solver and
    defaults (Adam, learning rate 1e-3, batches of 200, L2 1e-4), the hidden layers frozen: the
    way a deployed model's classifier is refreshed without touching its feature extractor."""
    mlp = copy.deepcopy(mlp)
    h = x / PIXEL_MAX
    for w, b in zip(mlp.coefs_[:-1], mlp.intercepts_[:-1]):
        h = np.maximum(h @ w + b, 0)
    w, b = mlp.coefs_[-1].copy(), mlp.intercepts_[-1].copy()
    onehot = np.eye(w.shape[1])[y]
    moments = [[np.zeros_like(p), np.zeros_like(p)] for p in (w, b)]
    rng, step = np.random.default_rng(seed), 0
    for _ in range(epochs):
        order = rng.permutation(len(h))
        for start in range(0, len(h), 200):
            i = order[start:start + 200]
            z = h[i] @ w + b
            p = np.exp(z - z.max(axis=1, keepdims=True))
            g = (p / p.sum(axis=1, keepdims=True) - onehot[i]) / len(i)
            grads = (h[i].T @ g + 1e-4 * w / len(i), g.sum(axis=0))
            step += 1
            for param, grad, (m, v) in zip((w, b), grads, moments):
                m[:] = 0.9 * m + 0.1 * grad
                v[:] = 0.999 * v + 0.001 * grad * grad
                param -= 1e-3 * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
    mlp.coefs_[-1], mlp.intercepts_[-1] = w, b
    return mlp


def finish_graph(name, nodes, inits, in_shape):
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="outpost-models")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def pca_filters(x_train, count):
    """Unsupervised 3x3 conv filters: the principal components of image patches."""
    imgs = x_train.reshape(-1, 8, 8) / PIXEL_MAX
    patches = np.stack([imgs[:, i:i + 3, j:j + 3].reshape(len(imgs), 9)
                        for i in range(6) for j in range(6)], axis=1).reshape(-1, 9)
    patches = patches - patches.mean(axis=0)
    _, _, vt = np.linalg.svd(patches, full_matrices=False)
    return vt[:count].reshape(count, 1, 3, 3).astype(np.float32)


def cnn_features(x, filters):
    """Conv(3x3, pad 1) -> ReLU -> MaxPool(2x2) -> flatten, in numpy, as the ONNX graph does."""
    imgs = np.pad(x.reshape(-1, 8, 8) / PIXEL_MAX, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((len(x), len(filters), 8, 8), np.float32)
    for f, k in enumerate(filters[:, 0]):
        for i in range(3):
            for j in range(3):
                out[:, f] += k[i, j] * imgs[:, i:i + 8, j:j + 8]
    out = np.maximum(out, 0)
    pooled = out.reshape(len(x), len(filters), 4, 2, 4, 2).max(axis=(3, 5))
    return pooled.reshape(len(x), -1)


def cnn_graph(name, filters, head):
    w = head.coef_.T.astype(np.float32)  # (features, 10)
    b = head.intercept_.astype(np.float32)
    inits = [
        numpy_helper.from_array(filters / PIXEL_MAX, "conv.weight"),
        numpy_helper.from_array(np.zeros(len(filters), np.float32), "conv.bias"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat.shape"),
        numpy_helper.from_array(w, "fc.weight"),
        numpy_helper.from_array(b, "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["conv.out"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv.out"], ["conv.relu"], name="relu"),
        helper.make_node("MaxPool", ["conv.relu"], ["pool.out"], kernel_shape=[2, 2], strides=[2, 2],
                         name="pool"),
        helper.make_node("Reshape", ["pool.out", "flat.shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc.weight"], ["fc.mm"], name="fc_matmul"),
        helper.make_node("Add", ["fc.mm", "fc.bias"], ["logits"], name="fc_add"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
    ]
    return finish_graph(name, nodes, inits, ["batch", 1, 8, 8])


# ---------------------------------------------------------------------------------------------
# Quantization with ONNX Runtime's own tools.


class Calibration(CalibrationDataReader):
    def __init__(self, x):
        self.batches = iter([{"input": x[i:i + 32]} for i in range(0, len(x), 32)])

    def get_next(self):
        return next(self.batches, None)


def quantize(model, kind, calib, tmp, quantize_softmax=False, overrides=None):
    """kind: qdq (static, QuantizeLinear/DequantizeLinear pairs), qop (static QOperator:
    QLinearMatMul/QLinearConv) or dynamic (MatMulInteger/ConvInteger + DynamicQuantizeLinear).
    overrides: ONNX Runtime's TensorQuantOverrides, to quantize single tensors differently."""
    src = os.path.join(tmp, "float.onnx")
    dst = os.path.join(tmp, f"{kind}.onnx")
    onnx.save(model, src)
    if kind == "dynamic":
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Conv"], weight_type=QuantType.QUInt8)
    else:
        # The final Softmax stays float: a quantized Softmax loses most of its precision at
        # INT8 and is the form tract 0.23 gets wrong (see hazards/).
        ops = ["MatMul", "Conv", "Add", "Relu", "MaxPool"] if kind == "qdq" else ["MatMul", "Conv"]
        if quantize_softmax:
            ops.append("Softmax")
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
        if overrides:
            # Only when given, so the other models are quantized with exactly the options
            # they were made with.
            extra["TensorQuantOverrides"] = overrides
        # reduce_range: 7-bit weights (-64..63). ONNX Runtime's u8s8 kernels on x86 CPUs without
        # AVX-512 VNNI multiply with VPMADDUBSW, which adds two u8 x s8 products into a saturating
        # int16: 255 * (127 + 127) overflows it, 255 * (64 + 64) does not. With 7-bit weights every
        # CPU computes the exact integer arithmetic, so one golden file holds everywhere (tract
        # computes it exactly too). Dynamic quantization above uses u8 weights (u8u8 kernels,
        # which widen to int16 before multiplying and never saturate).
        quantize_static(
            src, dst, Calibration(calib),
            quant_format=QuantFormat.QDQ if kind == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=ops,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            reduce_range=True,
            extra_options=extra,
        )
    out = onnx.load(dst)
    out.producer_name = "outpost-models"
    return out


def successor_plan(edge_mlp, edge_f, x_train, y_train):
    """digits-edge's successors, each quantized like it (static QDQ, same calibration images) so
    that what differs between the files is what changed in the model: (name, float model,
    TensorQuantOverrides, form)."""
    head = finetune_head(edge_mlp, x_train, y_train, HEAD_EPOCHS, seed=SEED + 1)
    retrain = MLPClassifier(hidden_layer_sizes=(32,), max_iter=600, random_state=RETRAIN_SEED).fit(
        x_train / PIXEL_MAX, y_train)
    return [
        ("digits-edge-head", mlp_graph("digits-edge-head", head, 64), None,
         "INT8, static QDQ; head (fc1) fine-tuned"),
        # Same float graph; per-channel scales for the first MatMul's weights only. Calibration
        # runs on the float model, so every activation's scale and zero point stay as they were.
        ("digits-edge-requant", edge_f, {"fc0.weight": [{"axis": 1}]},
         "INT8, static QDQ; fc0 weights per-channel"),
        ("digits-edge-retrain", mlp_graph("digits-edge-retrain", retrain, 64), None,
         "INT8, static QDQ; retrained"),
    ]


def softmax_output_scale(model):
    """The scale of the QuantizeLinear that quantizes the model's Softmax output."""
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == softmax.output[0])
    init = {t.name: t for t in model.graph.initializer}
    return float(numpy_helper.to_array(init[q.input[1]]))


def unknown_op_model():
    """A model using an operator no runtime implements: every backend must refuse it at load
    time, naming the operator."""
    node = helper.make_node("Frobnicate", ["input"], ["probabilities"], domain="com.example", name="frob0")
    graph = helper.make_graph(
        [node], "unknown-op",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.example", 1)],
                              producer_name="outpost-models")
    model.ir_version = 8
    return model


def two_input_add_model():
    """`y = a + b`, both inputs `[batch, 4]`: the smallest model with two inputs sharing a batch
    dimension, for what a batcher must check (requests whose inputs disagree on it)."""
    node = helper.make_node("Add", ["a", "b"], ["y"], name="add0")
    graph = helper.make_graph(
        [node], "add-two-inputs",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="outpost-models")
    model.ir_version = 8
    return model


# ---------------------------------------------------------------------------------------------
# Outputs.


def ort_session(model_bytes):
    """An ONNX Runtime CPU session that computes INT8 exactly on every CPU: without this option,
    x86 CPUs lacking AVX-512 VNNI run u8s8 products through saturating int16 arithmetic."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_ort(model, x):
    sess = ort_session(model.SerializeToString())
    return sess.run(["probabilities"], {"input": x})[0]


def accuracy(model, x, y):
    return float((run_ort(model, x).argmax(axis=1) == y).mean())


def tensor_json(name, arr):
    return {"name": name, "datatype": "FP32", "shape": list(arr.shape),
            "data": [float(v) for v in arr.astype(np.float32).ravel()]}


def write_model(dirpath, name, model, golden_x, tolerance=GOLDEN_TOLERANCE, tolerance_reason=None):
    path = os.path.join(dirpath, f"{name}.onnx")
    onnx.save(model, path)
    probs = run_ort(model, golden_x)
    golden = {
        "model": name,
        "produced_by": f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
        "tolerance": tolerance,
        "inputs": [tensor_json("input", golden_x)],
        "outputs": [tensor_json("probabilities", probs)],
    }
    if tolerance_reason:
        golden["tolerance_reason"] = tolerance_reason
    with open(os.path.join(dirpath, f"{name}.golden.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    return path


def ops_of(model):
    return sorted({n.op_type for n in model.graph.node})


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    np.random.seed(SEED)
    x_train, x_test, y_train, y_test = load_split()
    calib = x_train[:256]
    x_cnn_train, x_cnn_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)

    edge_mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=600, random_state=SEED).fit(
        x_train / PIXEL_MAX, y_train)
    central_mlp = MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=600, random_state=SEED).fit(
        x_train / PIXEL_MAX, y_train)
    filters = pca_filters(x_train, 8)
    head = LogisticRegression(max_iter=2000, C=10.0).fit(cnn_features(x_train, filters), y_train)

    edge_f = mlp_graph("digits-edge", edge_mlp, 64)
    central_f = mlp_graph("digits-central", central_mlp, 64)
    cnn_f = cnn_graph("digits-cnn", filters, head)

    rows = []  # name, file, form, ops, float acc, model acc, inputs
    successor_rows = []  # the same, for successors/
    with tempfile.TemporaryDirectory() as tmp:
        mlp_in = (x_train[:calib.shape[0]], x_test, x_test[:GOLDEN_SAMPLES])
        cnn_in = (x_cnn_train[:calib.shape[0]], x_cnn_test, x_cnn_test[:GOLDEN_SAMPLES])
        plan = [
            ("digits-edge", edge_f, "qdq", mlp_in, "INT8, static QDQ (QuantizeLinear/DequantizeLinear)"),
            ("digits-edge-qop", edge_f, "qop", mlp_in, "INT8, static QOperator (QLinearMatMul)"),
            ("digits-edge-dynamic", edge_f, "dynamic", mlp_in, "INT8, dynamic (MatMulInteger)"),
            ("digits-cnn", cnn_f, "qdq", cnn_in, "INT8, static QDQ"),
            ("digits-cnn-qop", cnn_f, "qop", cnn_in, "INT8, static QOperator (QLinearConv, QLinearMatMul)"),
            ("digits-cnn-dynamic", cnn_f, "dynamic", cnn_in, "INT8, dynamic (ConvInteger, MatMulInteger)"),
            ("digits-central", central_f, None, mlp_in, "FP32"),
        ]
        for name, float_model, kind, (cal, xt, gx), form in plan:
            model = quantize(float_model, kind, cal, tmp) if kind else float_model
            model.graph.name = name
            path = write_model(HERE, name, model, gx)
            rows.append((name, path, form, ops_of(model), accuracy(float_model, xt, y_test),
                         accuracy(model, xt, y_test), "[batch, 64]" if xt.ndim == 2 else "[batch, 1, 8, 8]"))

        hazards = os.path.join(HERE, "hazards")
        os.makedirs(hazards, exist_ok=True)
        qsoft = quantize(edge_f, "qdq", calib, tmp, quantize_softmax=True)
        qsoft.graph.name = "digits-edge-qsoftmax"
        # ONNX Runtime fuses DequantizeLinear -> Softmax -> QuantizeLinear into its QLinearSoftmax
        # kernel (exp from a table over the 256 input codes), which rounds differently from the
        # float Softmax the graph specifies: up to one step of the output's quantization.
        step = softmax_output_scale(qsoft)
        write_model(hazards, "digits-edge-qsoftmax", qsoft, x_test[:GOLDEN_SAMPLES],
                    tolerance=float(np.float32(step * 1.01)),
                    tolerance_reason=(
                        "one step of the quantized Softmax's output scale: ONNX Runtime (which made these "
                        "outputs) computes DequantizeLinear-Softmax-QuantizeLinear with its fused QLinearSoftmax "
                        "kernel, whose table-based exp rounds differently from the float Softmax the graph "
                        "specifies (which tract computes)"))
        onnx.save(unknown_op_model(), os.path.join(hazards, "unknown-op.onnx"))
        onnx.save(two_input_add_model(), os.path.join(hazards, "add-two-inputs.onnx"))

        successors = os.path.join(HERE, "successors")
        os.makedirs(successors, exist_ok=True)
        for name, float_model, overrides, form in successor_plan(edge_mlp, edge_f, x_train, y_train):
            model = quantize(float_model, "qdq", calib, tmp, overrides=overrides)
            model.graph.name = name
            path = write_model(successors, name, model, x_test[:GOLDEN_SAMPLES])
            successor_rows.append((name, path, form, ops_of(model), accuracy(float_model, x_test, y_test),
                                   accuracy(model, x_test, y_test), "[batch, 64]"))

    with open(os.path.join(HERE, "digits-test.csv"), "w") as f:
        f.write("label," + ",".join(f"p{i}" for i in range(64)) + "\n")
        for label, row in zip(y_test, x_test.astype(int)):
            f.write(f"{label}," + ",".join(map(str, row)) + "\n")

    files = sorted(
        [os.path.relpath(p, HERE) for p in
         [os.path.join(d, f) for d in (HERE, hazards, successors) for f in os.listdir(d)]
         if p.endswith((".onnx", ".golden.json", ".csv"))])
    with open(os.path.join(HERE, "SHA256SUMS"), "w") as f:
        for rel in files:
            f.write(f"{sha256(os.path.join(HERE, rel))}  {rel}\n")

    write_card(rows, successor_rows, len(y_test))
    for name, path, form, ops, facc, qacc, _ in rows + successor_rows:
        print(f"{name:22} {os.path.getsize(path):>8} B  float {facc:.4f}  model {qacc:.4f}  {form}")


def model_table(rows):
    table = ["| model | form | input | size | float accuracy | accuracy | ops | sha256 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, path, form, ops, facc, qacc, shape in rows:
        table.append(f"| `{name}` | {form} | `input` {shape} | {os.path.getsize(path):,} B | "
                     f"{facc:.2%} | {qacc:.2%} | {', '.join(ops)} | `{sha256(path)[:16]}…` |")
    return "\n".join(table)


def write_card(rows, successor_rows, n_test):
    with open(os.path.join(HERE, "CARD.in.md")) as f:
        template = f.read()
    card = template.replace("{{TABLE}}", model_table(rows)).replace("{{N_TEST}}", str(n_test))
    card = card.replace("{{SUCCESSORS}}", model_table(successor_rows))
    card = card.replace("{{ORT}}", ort.__version__)
    with open(os.path.join(HERE, "README.md"), "w") as f:
        f.write(card)


if __name__ == "__main__":
    sys.exit(main())
