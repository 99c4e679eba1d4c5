"""A TF Serving client for Cascade: the official `tensorflow-serving-api` stubs over gRPC, or REST.

Works against `cascade serve` and the real `tensorflow_model_server` alike; nothing here knows
which one answers.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc, predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

AVAILABLE = 30  # ModelVersionStatus.State.AVAILABLE


def wait_until_available(server: str, model: str, timeout: float = 120.0) -> None:
    """Polls GetModelStatus until some version of `model` is AVAILABLE (the server may be loading)."""
    deadline = time.monotonic() + timeout
    channel = grpc.insecure_channel(server)
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    last_error = "no answer"
    while time.monotonic() < deadline:
        try:
            response = stub.GetModelStatus(request, timeout=5)
            if any(v.state == AVAILABLE for v in response.model_version_status):
                return
            last_error = "no version AVAILABLE yet"
        except grpc.RpcError as error:
            last_error = f"{error.code().name}: {error.details()}"
        time.sleep(0.5)
    raise TimeoutError(f"{model} on {server} not AVAILABLE after {timeout:.0f} s ({last_error})")


def predict_grpc(server: str, model: str, inputs: dict[str, list[str]], timeout: float = 30.0) -> dict:
    """One Predict call; returns {output name: numpy array} (strings decoded)."""
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(server))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for name, values in inputs.items():
        request.inputs[name].CopyFrom(_string_tensor(values))
    response = stub.Predict(request, timeout=timeout)
    return {name: _to_numpy(tensor) for name, tensor in response.outputs.items()}


def predict_rest(url: str, model: str, inputs: dict[str, list[str]], timeout: float = 30.0) -> dict:
    """One REST predict call in the columnar format; returns {output name: numpy array}."""
    body = json.dumps({"inputs": inputs}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/models/{model}:predict", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            outputs = json.loads(response.read())["outputs"]
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"{url}: HTTP {error.code}: {error.read().decode()[:500]}") from None
    if not isinstance(outputs, dict):  # a single output loses its name in TF Serving's REST API
        outputs = {"output": outputs}
    return {name: np.array(value) for name, value in outputs.items()}


def _string_tensor(values: list[str]) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(values))]),
        string_val=[v.encode() for v in values])


def _to_numpy(tensor: tensor_pb2.TensorProto) -> np.ndarray:
    shape = [d.size for d in tensor.tensor_shape.dim]
    if tensor.dtype == types_pb2.DT_STRING:
        return np.array([v.decode() for v in tensor.string_val], dtype=object).reshape(shape)
    if tensor.tensor_content:
        dtype = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_INT64: np.int64,
                 types_pb2.DT_INT32: np.int32}[tensor.dtype]
        return np.frombuffer(tensor.tensor_content, dtype).reshape(shape)
    values = {types_pb2.DT_FLOAT: tensor.float_val, types_pb2.DT_INT64: tensor.int64_val,
              types_pb2.DT_INT32: tensor.int_val}[tensor.dtype]
    return np.array(values).reshape(shape)
