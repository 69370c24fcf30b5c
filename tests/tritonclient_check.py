"""Drives a running outpost with the real tritonclient[http] package: server and model metadata,
readiness, inference with JSON and with binary tensors, statistics, and an error case.

Usage: python tritonclient_check.py HOST:PORT MODELS_DIR
Exits non-zero (AssertionError or the client's exception) on any mismatch.
"""

import json
import os
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def golden(models, name):
    with open(os.path.join(models, f"{name}.golden.json")) as f:
        g = json.load(f)
    x = np.array(g["inputs"][0]["data"], dtype=np.float32).reshape(g["inputs"][0]["shape"])
    y = np.array(g["outputs"][0]["data"], dtype=np.float32).reshape(g["outputs"][0]["shape"])
    return x, y, g["tolerance"]


def main(url, models):
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "outpost", meta
    assert "binary_tensor_data" in meta["extensions"], meta

    for name, shape in [("digits-edge", [-1, 64]), ("digits-cnn", [-1, 1, 8, 8])]:
        assert client.is_model_ready(name)
        assert client.is_model_ready(name, "1")
        m = client.get_model_metadata(name)
        assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": shape}], m
        assert m["outputs"][0]["name"] == "probabilities", m

        x, y, tol = golden(models, name)
        for binary in (False, True):
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
            result = client.infer(name, [inp], outputs=[out], request_id="req-1")
            got = result.as_numpy("probabilities")
            assert got.shape == y.shape, (got.shape, y.shape)
            diff = float(np.abs(got - y).max())
            assert diff <= tol, f"{name} binary={binary}: max diff {diff}"
            assert result.get_response()["id"] == "req-1"
            print(f"{name} binary={binary}: max diff {diff:.2e}")

    index = client.get_model_repository_index()
    assert {m["name"] for m in index} >= {"digits-edge", "digits-cnn"}, index
    stats = client.get_inference_statistics("digits-edge")
    assert stats["model_stats"][0]["inference_count"] >= 2, stats

    # Error case: the client raises with the server's message.
    bad = httpclient.InferInput("input", [1, 32], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 32), dtype=np.float32), binary_data=False)
    try:
        client.infer("digits-edge", [bad])
        raise AssertionError("a wrong shape was accepted")
    except InferenceServerException as e:
        assert "does not match the model's [-1, 64]" in e.message(), e.message()
        print("error case:", e.message())
    try:
        client.get_model_metadata("no-such-model")
        raise AssertionError("an unknown model had metadata")
    except InferenceServerException as e:
        assert "unknown model" in e.message(), e.message()
    assert not client.is_model_ready("no-such-model")
    print("tritonclient checks passed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
