"""`cascade serve` against TF Serving's contract (TFSERVING.md): the official gRPC stubs and plain
HTTP, against servers started here on free loopback ports, over tiny SavedModels built here."""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime
import ipaddress
import json
import logging
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import classification_pb2, get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2, inference_pb2, model_management_pb2
from tensorflow_serving.apis import model_pb2, model_service_pb2_grpc, predict_pb2
from tensorflow_serving.apis import prediction_log_pb2, prediction_service_pb2_grpc
from tensorflow_serving.apis import regression_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.model_server import health
from serving.model_server import servable
from serving.model_server import server
from serving.model_server import config as server_config
from serving.model_server.batching import Batcher
from serving.model_server.server import Server, ServerOptions

REPO = pathlib.Path(__file__).resolve().parents[2]
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
AVAILABLE, END = 30, 50  # ModelVersionStatus.State


# ----------------------------------------------------------------------------- tiny models

class Recommender(tf.Module):
    """serving_default: user_id [B] -> item_ids [B,3] ("<user>-a", ...) and scores [B,3]
    (len(user) + offset + 0.5, 0.25, 0.125); `pair` and `lengths` are two more signatures."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = tf.Variable(offset)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user_id")])
    def serve(self, user_id):
        items = user_id[:, None] + tf.constant([["-a", "-b", "-c"]])
        length = tf.cast(tf.strings.length(user_id), tf.float32)[:, None]
        scores = length + tf.constant([[0.5, 0.25, 0.125]]) + self.offset
        return {"item_ids": items, "scores": scores}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user_id"),
                                  tf.TensorSpec([None, None], tf.string, name="item_ids")])
    def pair(self, user_id, item_ids):
        lengths = tf.strings.length(user_id)[:, None] + tf.strings.length(item_ids)
        return {"scores": tf.cast(lengths, tf.float32), "echo_bytes": user_id}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user_id")])
    def lengths(self, user_id):
        return {"length": tf.strings.length(user_id)}


def predict_request(name="recs", users=("ab", "c"), **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=name, **spec))
    request.inputs["user_id"].CopyFrom(tf.make_tensor_proto(np.array(users, dtype=object)))
    return request


def expected_scores(users, offset):
    return np.array([[len(u) + offset + d for d in (0.5, 0.25, 0.125)] for u in users], np.float32)


def write_warmup(version_dir: pathlib.Path, requests) -> None:
    extra = version_dir / "assets.extra"
    extra.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(extra / "tf_serving_warmup_requests")) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictLog(request=request)
            writer.write(prediction_log_pb2.PredictionLog(predict_log=log).SerializeToString())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[int, pathlib.Path]:
    """Two SavedModels (score offsets 0 and 10) with one warmup request each."""
    root = tmp_path_factory.mktemp("saved")
    paths = {}
    for version, offset in ((1, 0.0), (2, 10.0)):
        module = Recommender(offset)
        path = root / str(version)
        tf.saved_model.save(module, str(path), signatures={
            "serving_default": module.serve, "pair": module.pair, "lengths": module.lengths})
        write_warmup(path, [predict_request(users=("warm",))])
        paths[version] = path
    return paths


def install(source: pathlib.Path, model_dir: pathlib.Path, version: int) -> pathlib.Path:
    """Copies a version beside the model, then renames it into place, as exports must."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir.parent / f".staging-{model_dir.name}-{version}"
    shutil.copytree(source, staging)
    target = model_dir / str(version)
    os.rename(staging, target)
    return target


def wait_for(condition, timeout: float = 60.0, what: str = "the condition"):
    """Polls `condition`, bounded in time and count, until it returns something truthy."""
    end = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        result = condition()
        if result:
            return result
        if time.monotonic() > end:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Client:
    """The official stubs, plus urllib for REST."""

    def __init__(self, srv: Server):
        self.server = srv
        self.channel = grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}")
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def close(self):
        self.channel.close()

    def error(self, call, request, timeout: float = 30) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=timeout)
        return raised.value

    def status(self, name, version=None) -> get_model_status_pb2.GetModelStatusResponse:
        spec = model_pb2.ModelSpec(name=name)
        if version is not None:
            spec.version.value = version
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
        return self.models.GetModelStatus(request, timeout=30)

    def http(self, method: str, path: str, body=None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        url = f"http://127.0.0.1:{self.server.rest_port}{path}"
        request = urllib.request.Request(url, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


def versions(status) -> dict[int, int]:
    return {entry.version: entry.state for entry in status.model_version_status}


# ----------------------------------------------------------------------------- the main server

@pytest.fixture(scope="module")
def base(saved, tmp_path_factory) -> pathlib.Path:
    """The `cascade export` layout: models.config naming `recs` (policy all, two labels) and
    `latest` (default policy), each with versions 1 and 2."""
    base = tmp_path_factory.mktemp("models")
    for version in (1, 2):
        install(saved[version], base / "recs", version)
        install(saved[version], base / "latest", version)
    (base / "models.config").write_text(f"""
model_config_list {{
  config {{
    name: "recs" base_path: "{base / 'recs'}" model_platform: "tensorflow"
    model_version_policy {{ all {{}} }}
    version_labels {{ key: "stable" value: 1 }} version_labels {{ key: "canary" value: 2 }}
  }}
  config {{ name: "latest" base_path: "{base / 'latest'}" model_platform: "tensorflow" }}
}}""")
    return base


@pytest.fixture(scope="module")
def client(base):
    options = ServerOptions(server_config.config_for_base_path(base), port=0, rest_api_port=0,
                            file_system_poll_wait_seconds=0, enable_grpc_healthcheck_service=True)
    with Server(options).start() as srv:
        client = Client(srv)
        yield client
        client.close()


def test_predict_answers_with_the_resolved_model_spec_and_typed_values(client):
    response = client.predict.Predict(predict_request(users=("ab", "c")), timeout=30)
    assert response.model_spec.name == "recs"
    assert response.model_spec.signature_name == "serving_default"  # empty means serving_default
    assert response.model_spec.version.value == 2  # no version: the highest AVAILABLE one
    scores = response.outputs["scores"]
    assert not scores.tensor_content and len(scores.float_val) == 6  # as TF Serving's AsProtoField
    np.testing.assert_allclose(tf.make_ndarray(scores), expected_scores(["ab", "c"], 10.0))
    assert tf.make_ndarray(response.outputs["item_ids"]).tolist() == [
        [b"ab-a", b"ab-b", b"ab-c"], [b"c-a", b"c-b", b"c-c"]]
    only = predict_request()
    only.output_filter.append("scores")
    assert list(client.predict.Predict(only, timeout=30).outputs) == ["scores"]


def test_version_policies_and_labels(client):
    def version_of(**spec):
        return client.predict.Predict(predict_request(**spec), timeout=30).model_spec.version.value

    assert version_of(version={"value": 1}) == 1
    assert version_of(version_label="stable") == 1
    assert version_of(version_label="canary") == 2
    assert version_of(name="latest") == 2
    assert versions(client.status("recs")) == {1: AVAILABLE, 2: AVAILABLE}  # policy `all`
    assert versions(client.status("latest")) == {2: AVAILABLE}  # default policy: latest 1
    error = client.error(client.predict.Predict, predict_request("latest", version={"value": 1}))
    assert (error.code(), error.details()) == (
        NOT_FOUND, "Servable not found for request: Specific(latest, 1)")


def _tensor(values, dtype=None):
    return tf.make_tensor_proto(np.array(values, dtype=dtype))


def _request(spec=None, inputs=None, output_filter=()):
    request = predict_pb2.PredictRequest(output_filter=list(output_filter))
    if spec is not None:
        request.model_spec.CopyFrom(model_pb2.ModelSpec(**spec))
    for name, tensor in (inputs or {"user_id": _tensor([b"ab"], object)}).items():
        request.inputs[name].CopyFrom(tensor)
    return request


def _broken_tensor():
    tensor = _tensor([1.0, 2.0], np.float32)
    tensor.tensor_content = b"\x00" * 5  # not a whole number of floats
    return tensor


def _huge_tensor():
    tensor = _tensor([b"x"], object)
    tensor.tensor_shape.dim[0].size = 1 << 40  # one value, claimed to fill a huge shape
    return tensor


RECS, PAIR = {"name": "recs"}, {"name": "recs", "signature_name": "pair"}
USER, ITEMS = _tensor([b"ab"], object), _tensor([[b"x", b"yy"]], object)
PREDICT_ERRORS = [  # (request, code, message or a part of it): the Predict rows of the table
    (_request(), INVALID, "Missing ModelSpec"),
    (_request({"name": ""}), INVALID, "ModelSpec has no name specified."),
    (_request({"name": "nope"}), NOT_FOUND, "Servable not found for request: Latest(nope)"),
    (_request({**RECS, "version": {"value": 7}}), NOT_FOUND,
     "Servable not found for request: Specific(recs, 7)"),
    (_request({**RECS, "version_label": "nope"}), INVALID,
     "Unrecognized servable version label: nope"),
    (_request({**RECS, "signature_name": "nope"}), grpc.StatusCode.FAILED_PRECONDITION,
     'Serving signature key "nope" not found.'),
    (_request(PAIR), INVALID, "input size does not match signature: 1!=2 len({user_id}) != "
     "len({item_ids,user_id}). Sent extra: {}. Missing but required: {item_ids}."),
    (_request(RECS, {"user_id": USER, "item_ids": ITEMS}), INVALID,
     "Sent extra: {item_ids}. Missing but required: {}."),
    (_request(PAIR, {"user_id": USER, "items": ITEMS}), INVALID, "Sent extra: {items}. Missing "
     "but required: {item_ids}. Expected inputs: {item_ids,user_id}."),
    (_request(RECS, output_filter=["nope"]), INVALID, "output tensor alias not found in "
     "signature: nope Outputs expected to be in the set {item_ids,scores}."),
    (_request(RECS, output_filter=["scores", "scores"]), INVALID,
     "duplicate output tensor alias: scores"),
    (_request(RECS, {"user_id": _tensor([1.5], np.float32)}), INVALID,
     "Expects arg[0] (user_id) to be string but float32 is provided"),
    (_request(RECS, {"user_id": _tensor([[b"a", b"b"]], object)}), INVALID,
     "input user_id has shape [1,2] but the signature expects shape [-1]"),
    (_request(RECS, {"user_id": _broken_tensor()}), INVALID, "tensor parsing error: user_id"),
    (_request(RECS, {"user_id": _huge_tensor()}), INVALID, "tensor parsing error: user_id"),
    (_request(PAIR, {"user_id": _tensor([b"a", b"b"], object),
                     "item_ids": _tensor([[b"x"]] * 3, object)}),
     INVALID, "Incompatible shapes"),  # the graph's own error keeps its TF status code
]


@pytest.mark.parametrize("request_, code, message", PREDICT_ERRORS)
def test_predict_errors_follow_the_status_table(client, request_, code, message):
    error = client.error(client.predict.Predict, request_)
    assert error.code() == code
    assert message in error.details()


def test_long_messages_are_cut_at_1024_characters(client):
    request = _request({**RECS, "signature_name": "x" * 3000})
    error = client.error(client.predict.Predict, request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(error.details()) == 1024 + len("...TRUNCATED")
    assert error.details().endswith("...TRUNCATED")


def test_model_service_metadata_and_unimplemented_errors(client):
    status = get_model_status_pb2.GetModelStatusRequest
    metadata = get_model_metadata_pb2.GetModelMetadataRequest
    unimplemented = grpc.StatusCode.UNIMPLEMENTED
    cases = [
        (client.models.GetModelStatus, status(), INVALID, "Missing ModelSpec"),
        (client.models.GetModelStatus, status(model_spec={"name": "nope"}), NOT_FOUND,
         "Could not find any versions of model nope"),
        (client.models.GetModelStatus, status(model_spec={**RECS, "version": {"value": 7}}),
         NOT_FOUND, "Could not find version 7 of model recs"),
        (client.predict.GetModelMetadata, metadata(model_spec=RECS), INVALID,
         "GetModelMetadataRequest must specify at least one metadata_field"),
        (client.predict.GetModelMetadata,
         metadata(model_spec=RECS, metadata_field=["signature_def", "other"]), INVALID,
         "Metadata field other is not supported"),
        (client.predict.GetModelMetadata,
         metadata(model_spec={"name": "nope"}, metadata_field=["signature_def"]), NOT_FOUND,
         "Servable not found for request: Latest(nope)"),
        (client.predict.Classify, classification_pb2.ClassificationRequest(), unimplemented,
         "Classify"),
        (client.predict.Regress, regression_pb2.RegressionRequest(), unimplemented, "Regress"),
        (client.predict.MultiInference, inference_pb2.MultiInferenceRequest(), unimplemented,
         "MultiInference"),
    ]
    for call, request, code, message in cases:
        error = client.error(call, request)
        assert (error.code(), message in error.details()) == (code, True), error.details()


def _saved_signatures(path: pathlib.Path) -> get_model_metadata_pb2.SignatureDefMap:
    model = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    return get_model_metadata_pb2.SignatureDefMap(signature_def=model.meta_graphs[0].signature_def)


def test_metadata_is_the_saved_models_signature_def_map(client, base):
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec={**RECS, "version": {"value": 1}}, metadata_field=["signature_def"])
    response = client.predict.GetModelMetadata(request, timeout=30)
    assert (response.model_spec.name, response.model_spec.version.value) == ("recs", 1)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    assert signatures == _saved_signatures(base / "recs" / "1")

    code, body = client.http("GET", "/v1/models/recs/versions/1/metadata")
    assert code == 200
    assert body["model_spec"] == {"name": "recs", "version": "1", "signature_name": ""}
    as_json = body["metadata"]["signature_def"]
    assert json_format.ParseDict(as_json, get_model_metadata_pb2.SignatureDefMap()) == signatures
    assert as_json["signature_def"]["serving_default"]["inputs"]["user_id"] == {
        "name": "serving_default_user_id:0", "dtype": "DT_STRING",
        "tensor_shape": {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False}}


def test_rest_status_is_tf_servings_json(client):
    code, body = client.http("GET", "/v1/models/recs")
    ok = {"error_code": "OK", "error_message": ""}
    assert (code, body) == (200, {"model_version_status": [
        {"version": "2", "state": "AVAILABLE", "status": ok},
        {"version": "1", "state": "AVAILABLE", "status": ok}]})
    code, body = client.http("GET", "/v1/models/recs/versions/1")
    assert [entry["version"] for entry in body["model_version_status"]] == ["1"]


def test_rest_predict_in_row_and_columnar_formats(client):
    code, body = client.http("POST", "/v1/models/recs:predict", {"instances": ["ab", "c"]})
    assert code == 200
    assert body == {"predictions": [
        {"item_ids": ["ab-a", "ab-b", "ab-c"], "scores": expected_scores(["ab"], 10)[0].tolist()},
        {"item_ids": ["c-a", "c-b", "c-c"], "scores": expected_scores(["c"], 10)[0].tolist()}]}
    path = "/v1/models/recs/versions/1:predict"
    code, body = client.http("POST", path, {"inputs": {"user_id": ["ab"]}})
    assert (code, body["outputs"]["scores"]) == (200, expected_scores(["ab"], 0).tolist())
    code, body = client.http("POST", "/v1/models/recs/labels/stable:predict", {"inputs": ["ab"]})
    assert (code, body["outputs"]["item_ids"]) == (200, [["ab-a", "ab-b", "ab-c"]])
    # A single output loses its name, in both formats.
    rows = {"signature_name": "lengths", "instances": ["ab", "c"]}
    assert client.http("POST", "/v1/models/recs:predict", rows) == (200, {"predictions": [2, 1]})
    columns = {"signature_name": "lengths", "inputs": ["abc"]}
    assert client.http("POST", "/v1/models/recs:predict", columns) == (200, {"outputs": [3]})


def test_rest_binary_strings_travel_as_b64(client):
    encoded = base64.b64encode(b"\xff\x00user").decode()
    instances = [{"user_id": {"b64": encoded}, "item_ids": ["x", "yy"]},
                 {"user_id": "ab", "item_ids": ["x", "y"]}]
    body = {"signature_name": "pair", "instances": instances}
    code, answer = client.http("POST", "/v1/models/recs:predict", body)
    assert code == 200
    assert answer["predictions"] == [  # `echo_bytes` ends in _bytes: always base64
        {"echo_bytes": {"b64": encoded}, "scores": [7.0, 8.0]},
        {"echo_bytes": {"b64": base64.b64encode(b"ab").decode()}, "scores": [3.0, 3.0]}]


PREDICT_PATH = "/v1/models/recs:predict"
REST_ERRORS = [  # (method, path, body, HTTP code, message or a part of it)
    ("POST", "/v1/models/nope:predict", {"instances": ["a"]}, 404,
     "Servable not found for request: Latest(nope)"),
    ("POST", "/v1/models/recs/versions/7:predict", {"instances": ["a"]}, 404, "Specific(recs, 7)"),
    ("POST", "/v1/models/recs/labels/nope:predict", {"instances": ["a"]}, 400,
     "Unrecognized servable version label"),
    ("POST", PREDICT_PATH, {"signature_name": "nope", "instances": ["a"]}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("POST", PREDICT_PATH, {"signature_name": "pair", "inputs": {"user_id": ["a"]}}, 400,
     "Missing named input: item_ids in 'inputs' object."),
    ("POST", PREDICT_PATH, {"signature_name": "pair", "instances": [{"user_id": "a"}]}, 400,
     "keys must be equal to: item_ids,user_id"),
    ("POST", PREDICT_PATH, {"instances": [1.5]}, 400,
     "Type: Number is not of expected type: string"),
    ("POST", PREDICT_PATH, {"inputs": [["a", "b"]]}, 400, "but the signature expects shape [-1]"),
    ("POST", PREDICT_PATH, {"instances": ["a"], "inputs": ["a"]}, 400,
     "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"),
    ("POST", PREDICT_PATH, {"instances": []}, 400, "No values in 'instances' array"),
    ("POST", PREDICT_PATH, {}, 400, "Missing 'inputs' or 'instances' key"),
    ("POST", PREDICT_PATH, b"\x00garbage{", 400, "JSON Parse error"),
    ("POST", PREDICT_PATH, b"", 400, "JSON Parse error: The document is empty"),
    ("POST", PREDICT_PATH, b"[" * 100_000, 400, "JSON Parse error"),
    ("POST", "/v1/models/recs:classify", {"examples": []}, 501, "classify"),
    ("POST", "/v1/models/recs", {"instances": ["a"]}, 400,
     "Malformed request: POST /v1/models/recs"),
    ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
    ("GET", "/v1/models/recs/versions/7", None, 404, "Could not find version 7 of model recs"),
    ("GET", "/v1/models/nope/metadata", None, 404, "Servable not found for request: Latest(nope)"),
    ("GET", "/v1/models", None, 400, "Missing model name in request."),
]


@pytest.mark.parametrize("method, path, body, http_code, message", REST_ERRORS)
def test_rest_errors_follow_the_status_table(client, method, path, body, http_code, message):
    code, answer = client.http(method, path, body)
    assert code == http_code
    assert list(answer) == ["error"] and message in answer["error"]


def test_garbage_and_huge_requests_get_answers_and_the_server_keeps_serving(client):
    raw = client.channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    with pytest.raises(grpc.RpcError) as raised:
        raw(b"\xff\xff\xff\xff\xff", timeout=30)  # not a PredictRequest
    assert raised.value.code() == grpc.StatusCode.INTERNAL  # gRPC's answer to unparsable bytes
    users = [f"user{i}" for i in range(10_000)]
    response = client.predict.Predict(predict_request(users=users), timeout=60)
    assert tf.make_ndarray(response.outputs["item_ids"]).shape == (10_000, 3)
    big = predict_request(users=[f"{i:0100d}" for i in range(60_000)])
    big.output_filter.append("scores")
    assert big.ByteSize() > 5 * 2**20  # over gRPC's 4 MiB default; TF Serving takes INT32_MAX
    scores = client.predict.Predict(big, timeout=60).outputs["scores"]
    assert [d.size for d in scores.tensor_shape.dim] == [60_000, 3]
    code, body = client.http("POST", PREDICT_PATH, {"instances": users})
    assert code == 200 and len(body["predictions"]) == 10_000
    assert client.predict.Predict(predict_request(), timeout=30).model_spec.version.value == 2


def test_health_service(client):
    check = client.channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health.HealthCheckRequest.SerializeToString,
        response_deserializer=health.HealthCheckResponse.FromString)
    for service in ("", "PredictionService", "ModelService"):
        response = check(health.HealthCheckRequest(service=service), timeout=30)
        assert response.status == health.SERVING
    with pytest.raises(grpc.RpcError) as raised:
        check(health.HealthCheckRequest(service="nope"), timeout=30)
    assert raised.value.code() == NOT_FOUND


# ----------------------------------------------------------------------------- lifecycle

@pytest.fixture
def single_model(saved, tmp_path):
    """One model's base path (integer versions right under it), version 1, polled every 0.1 s."""
    model_dir = tmp_path / "recs"
    install(saved[1], model_dir, 1)
    options = ServerOptions(server_config.config_for_base_path(model_dir, "recs"), port=0,
                            rest_api_port=None, file_system_poll_wait_seconds=0.1)
    with Server(options).start() as srv:
        client = Client(srv)
        yield client, model_dir
        client.close()


def test_a_new_version_is_picked_up_with_zero_failed_requests(single_model, saved):
    client, model_dir = single_model
    seen, failures, stop = [], [], threading.Event()

    def load():  # bounded: at most 2,000 requests and 90 s per thread
        end = time.monotonic() + 90
        for _ in range(2000):
            if stop.is_set() or time.monotonic() > end:
                return
            try:
                response = client.predict.Predict(predict_request(users=("ab",)), timeout=30)
                seen.append(response.model_spec.version.value)
            except grpc.RpcError as error:
                failures.append(error)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(seen) >= 10, what="requests to version 1")
        install(saved[2], model_dir, 2)
        wait_for(lambda: versions(client.status("recs")) == {1: END, 2: AVAILABLE},
                 what="version 2 to replace version 1")
        count = len(seen)
        wait_for(lambda: len(seen) >= count + 10, what="requests after the swap")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures == []
    assert seen[0] == 1 and seen[-1] == 2
    first_two = seen.index(2)
    assert 1 not in seen[first_two + len(threads):]  # only requests already in flight finish on 1


def test_a_broken_version_leaves_the_old_one_serving(single_model, saved, tmp_path, caplog):
    client, model_dir = single_model
    (model_dir / "not-a-version").mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    with caplog.at_level(logging.WARNING, logger="serving"):
        install(corrupt, model_dir, 2)
        status = wait_for(lambda: (s := client.status("recs")) and versions(s).get(2) == END and s,
                          what="version 2 to fail")
    assert any("not-a-version" in r.getMessage() and "not an integer" in r.getMessage()
               for r in caplog.records)
    failed = {entry.version: entry for entry in status.model_version_status}[2]
    assert failed.status.error_code == grpc.StatusCode.DATA_LOSS.value[0]
    assert "saved_model.pb" in failed.status.error_message
    assert versions(status)[1] == AVAILABLE
    assert client.predict.Predict(predict_request(), timeout=30).model_spec.version.value == 1

    bad_warmup = tmp_path / "bad-warmup"
    shutil.copytree(saved[2], bad_warmup)
    write_warmup(bad_warmup, [predict_request(users=("a",)), predict_request(users=(("a", "b"),))])
    install(bad_warmup, model_dir, 3)  # its second warmup request fails, so the version fails
    status = wait_for(lambda: (s := client.status("recs")) and versions(s).get(3) == END and s,
                      what="version 3 to fail its warmup")
    failed = {entry.version: entry for entry in status.model_version_status}[3]
    assert "but the signature expects shape [-1]" in failed.status.error_message
    assert client.predict.Predict(predict_request(), timeout=30).model_spec.version.value == 1

    too_many = tmp_path / "too-many-warmup-records"
    shutil.copytree(saved[2], too_many)
    write_warmup(too_many, [predict_request(users=("a",))] * 1001)
    install(too_many, model_dir, 4)
    status = wait_for(lambda: (s := client.status("recs")) and versions(s).get(4) == END and s,
                      what="version 4 to fail its warmup")
    failed = {entry.version: entry for entry in status.model_version_status}[4]
    assert "Number of warmup records exceeds the maximum (1000)" in failed.status.error_message
    assert versions(status)[1] == AVAILABLE


def test_stopping_finishes_in_flight_requests(single_model, monkeypatch):
    client, _ = single_model
    srv = client.server
    loaded = srv.manager.servable("recs", 1)
    started, release = threading.Event(), threading.Event()
    original = loaded.run
    calls = []

    def slow_run(signature_name, inputs):
        calls.append(signature_name)
        started.set()
        release.wait(60)
        return original(signature_name, inputs)

    monkeypatch.setattr(loaded, "run", slow_run)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(client.predict.Predict, predict_request(), timeout=60)
        wait_for(started.is_set, what="the request to start")
        stopping = pool.submit(srv.stop, 30.0)
        wait_for(srv.wait, what="the server to start stopping")
        late = client.error(client.predict.Predict, predict_request())
        # No new requests once stopping: gRPC refuses the call, as UNAVAILABLE or, when the
        # transport is already shutting down, CANCELLED; either way the model never runs it.
        assert late.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        release.set()
        assert in_flight.result(timeout=60).model_spec.version.value == 1
        stopping.result(timeout=60)
    assert len(calls) == 1  # only the in-flight request reached the model


def test_reload_config_replaces_the_model_list(base):
    config = server_config.config_for_base_path(base)
    options = ServerOptions(config, port=0, rest_api_port=None, file_system_poll_wait_seconds=0)
    with Server(options).start() as srv:
        client = Client(srv)
        try:
            only_latest = model_server_config_pb2.ModelServerConfig()
            only_latest.model_config_list.config.add().CopyFrom(config.model_config_list.config[1])
            reload = client.models.HandleReloadConfigRequest
            request = model_management_pb2.ReloadConfigRequest(config=only_latest)
            assert reload(request, timeout=60).status.error_code == 0
            wait_for(lambda: set(versions(client.status("recs")).values()) == {END},
                     what="recs to unload")
            error = client.error(client.predict.Predict, predict_request())
            assert (error.code(), error.details()) == (
                NOT_FOUND, "Servable not found for request: Latest(recs)")
            answer = client.predict.Predict(predict_request(name="latest"), timeout=30)
            assert answer.model_spec.version.value == 2

            bad_label = model_server_config_pb2.ModelServerConfig()
            bad_label.CopyFrom(only_latest)
            bad_label.model_config_list.config[0].version_labels["old"] = 1  # 1 is not loaded
            error = client.error(reload, model_management_pb2.ReloadConfigRequest(config=bad_label))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "which is not currently available for inference" in error.details()
            custom = model_server_config_pb2.ModelServerConfig()
            custom.custom_model_config.Pack(only_latest)
            error = client.error(reload, model_management_pb2.ReloadConfigRequest(config=custom))
            assert error.code() == INVALID and "Only ModelConfigList" in error.details()
        finally:
            client.close()


# ----------------------------------------------------------------------------- batching

@pytest.fixture(scope="module")
def batching(saved, tmp_path_factory):
    """Batches of at most 4 rows, one batch thread, one waiting batch, and a 30 s batch timeout:
    a batch runs when it is full (the tests count batches, they never time anything)."""
    model_dir = tmp_path_factory.mktemp("batching") / "recs"
    install(saved[1], model_dir, 1)
    parameters = server_config.parse_batching_parameters(
        "max_batch_size { value: 4 }\nbatch_timeout_micros { value: 30000000 }\n"
        "max_enqueued_batches { value: 1 }\nnum_batch_threads { value: 1 }\n")
    options = ServerOptions(server_config.config_for_base_path(model_dir, "recs"), port=0,
                            rest_api_port=0, batching=parameters, file_system_poll_wait_seconds=0,
                            rest_api_timeout_in_ms=1000)
    with Server(options).start() as srv:
        client = Client(srv)
        yield client
        client.close()


def test_batching_merges_concurrent_requests_and_returns_each_its_rows(batching):
    batcher = batching.server.batcher
    batches, tasks = batcher.batches_run, batcher.tasks_run
    users = [("u1",), ("user22",), ("u333",), ("u4444",)]
    with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:  # no gRPC deadline here
        futures = [pool.submit(batching.predict.Predict, predict_request(users=u)) for u in users]
        responses = [future.result(timeout=120) for future in futures]
    for user, response in zip(users, responses):
        item_ids = tf.make_ndarray(response.outputs["item_ids"]).tolist()
        assert item_ids == [[f"{user[0]}-{c}".encode() for c in "abc"]]
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]),
                                   expected_scores(user, 0.0))
    assert (batcher.batches_run - batches, batcher.tasks_run - tasks) == (1, 4)  # 4 calls, 1 run


def test_batching_refuses_requests_larger_than_the_max_batch(batching):
    error = batching.error(batching.predict.Predict, predict_request(users=["u"] * 5))
    assert (error.code(), error.details()) == (
        INVALID, "Task size 5 is larger than maximum input batch size 4")
    error = batching.error(batching.predict.Predict, predict_request(users=["u"] * 10_000))
    assert error.code() == INVALID
    code, body = batching.http("POST", PREDICT_PATH, {"instances": ["a"] * 5})
    assert code == 400 and "larger than maximum input batch size" in body["error"]


def test_a_full_batch_queue_is_unavailable(batching, monkeypatch):
    loaded = batching.server.manager.servable("recs", 1)
    started, release = threading.Event(), threading.Event()
    original = loaded.run

    def blocking_run(signature_name, inputs):
        started.set()
        release.wait(60)
        return original(signature_name, inputs)

    monkeypatch.setattr(loaded, "run", blocking_run)
    four = [f"u{i}" for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(batching.predict.Predict, predict_request(users=four), timeout=120)
        try:
            wait_for(started.is_set, what="the first batch to run")
            waiting = pool.submit(batching.predict.Predict, predict_request(users=four),
                                  timeout=120)
            wait_for(lambda: batching.server.batcher.enqueued_tasks() == 1,
                     what="the second batch to queue")
            error = batching.error(batching.predict.Predict, predict_request(users=("x",)))
            assert (error.code(), error.details()) == (
                grpc.StatusCode.UNAVAILABLE,
                "The batch scheduling queue to which this task was submitted is full")
            code, body = batching.http("POST", PREDICT_PATH, {"instances": ["x"]})
            assert code == 503 and "queue" in body["error"]
        finally:
            release.set()
        for future in (running, waiting):
            item_ids = tf.make_ndarray(future.result(timeout=120).outputs["item_ids"])
            assert item_ids[:, 0].tolist() == [f"{u}-a".encode() for u in four]


def test_deadlines_are_deadline_exceeded(batching):
    # A lone row waits for its batch to fill (30 s batch timeout): its deadline passes first.
    error = batching.error(batching.predict.Predict, predict_request(users=("late",)), timeout=0.5)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    code, body = batching.http("POST", PREDICT_PATH, {"instances": ["late"]})  # REST timeout: 1 s
    assert (code, body) == (504, {"error": "Deadline Exceeded"})
    wait_for(lambda: batching.server.batcher.enqueued_tasks() == 0,
             what="expired requests to leave the queue")
    response = batching.predict.Predict(predict_request(users=("a", "b", "c", "d")), timeout=60)
    assert response.model_spec.version.value == 1


def test_batcher_pads_to_allowed_batch_sizes_and_variable_lengths():
    runs = []

    def run(inputs):
        runs.append(inputs["x"].copy())
        return {"y": inputs["x"].sum(axis=1)}

    padding = server_config.BatchingParameters(max_batch_size=4, batch_timeout_micros=0,
                                               num_batch_threads=1, allowed_batch_sizes=(2, 4))
    batcher = Batcher(padding).start()
    try:  # 3 rows run as an allowed batch of 4 (padded with the first row); 3 come back
        assert batcher.run(("a",), run, {"x": np.array([[1], [2], [3]])})["y"].tolist() == [1, 2, 3]
        assert runs[-1].tolist() == [[1], [2], [3], [1]]
    finally:
        batcher.stop(timeout=10)
    ragged = server_config.BatchingParameters(max_batch_size=4, batch_timeout_micros=30_000_000,
                                              num_batch_threads=1, pad_variable_length_inputs=True)
    batcher = Batcher(ragged).start()
    try:  # two 2-row requests fill one batch; the short rows are padded with their first value
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            short = pool.submit(batcher.run, ("b",), run, {"x": np.array([[1], [2]])})
            long = pool.submit(batcher.run, ("b",), run, {"x": np.array([[1, 2, 3]] * 2)})
            assert short.result(timeout=60)["y"].tolist() == [1 + 1 + 1, 2 + 1 + 1]
            assert long.result(timeout=60)["y"].tolist() == [6, 6]
        assert runs[-1].shape == (4, 3) and batcher.batches_run == 1
    finally:
        batcher.stop(timeout=10)


def test_write_batching_parameters_follows_the_cpu_advice(tmp_path):
    path = server_config.write_batching_parameters(tmp_path / "batching_parameters.txt")
    text = path.read_text()
    assert "max_batch_size { value: 128 }" in text and "batch_timeout_micros { value: 0 }" in text
    parameters = server_config.read_batching_parameters(path)
    cores = os.cpu_count()
    assert (parameters.num_batch_threads, parameters.max_enqueued_batches) == (cores, cores)
    with pytest.raises(server_config.ServerConfigError, match="allowed_batch_sizes"):
        server_config.parse_batching_parameters("max_batch_size { value: 8 }\n"
                                                "allowed_batch_sizes: 4")


# ----------------------------------------------------------------------------- flags, TLS, ScaNN

def test_flags_map_onto_server_options(base, tmp_path):
    parser = argparse.ArgumentParser()
    server_config.add_arguments(parser)
    (tmp_path / "batching.txt").write_text("max_batch_size { value: 8 }\n")
    args = parser.parse_args([
        "--model_base_path", str(base / "recs"), "--model_name", "m", "--port", "0",
        "--rest_api_port", "0", "--enable_batching", "--batching_parameters_file",
        str(tmp_path / "batching.txt"), "--enable_model_warmup=false"])
    options = server.options_from_args(args)
    entries = options.model_config.model_config_list.config
    assert [(c.name, c.base_path) for c in entries] == [("m", str((base / "recs").resolve()))]
    assert options.rest_api_port is None and options.batching.max_batch_size == 8
    assert options.num_request_iterations_for_warmup == 0 and options.host == "127.0.0.1"
    options = server.options_from_args(parser.parse_args(["--model-base-path", str(base)]))
    assert options.model_config == server_config.read_model_server_config(base / "models.config")
    with pytest.raises(server_config.ServerConfigError):
        server.options_from_args(parser.parse_args([]))


def self_signed(key_path: pathlib.Path, cert_path: pathlib.Path) -> None:
    """A P-256 key and a one-day certificate for 127.0.0.1, as PEM files (`cryptography`, a
    pinned test dependency: no openssl binary needed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_grpc_over_tls(saved, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    self_signed(key, cert)
    install(saved[1], tmp_path / "recs", 1)
    options = ServerOptions(server_config.config_for_base_path(tmp_path / "recs", "recs"), port=0,
                            rest_api_port=None, file_system_poll_wait_seconds=0,
                            tls=server_config.tls_from_files(cert, key))
    with Server(options).start() as srv:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{srv.grpc_port}", credentials) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            assert stub.Predict(predict_request(), timeout=30).model_spec.version.value == 1


def test_scann_exports_import_scann_before_loading(saved, tmp_path, monkeypatch):
    version = shutil.copytree(saved[1], tmp_path / "1")
    (version / "assets.extra" / "cascade_export.json").write_text(json.dumps({"index": "scann"}))
    imported = []
    monkeypatch.setattr(servable, "_import_scann", lambda: imported.append(True))
    assert servable.load_servable("retrieval", 1, version).version == 1
    assert imported == [True]

    (version / "assets.extra" / "cascade_export.json").unlink()
    load, calls = tf.saved_model.load, []

    def load_without_scann_ops(*args, **kwargs):  # as stock TF fails on a ScaNN export
        calls.append(True)
        if not imported[1:]:
            raise tf.errors.NotFoundError(None, None, "Op type not registered 'ScannSearchBatched'")
        return load(*args, **kwargs)

    monkeypatch.setattr(tf.saved_model, "load", load_without_scann_ops)
    assert servable.load_servable("retrieval", 1, version).version == 1
    assert (imported, len(calls)) == ([True, True], 2)


def test_sigterm_finishes_and_exits_zero(base):
    command = [sys.executable, "-m", "serving.model_server.server", "--model-base-path", str(base), "--port",
               "0", "--rest_api_port", "0", "--file_system_poll_wait_seconds", "0"]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr])
    reader.start()
    output, port = [], None
    try:
        end = time.monotonic() + 120
        while port is None and time.monotonic() < end and process.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            output.append(line)
            if "Running gRPC ModelServer at 127.0.0.1:" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
        assert port, "".join(output)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            assert stub.Predict(predict_request(), timeout=30).model_spec.version.value == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        reader.join(10)
    while not lines.empty():
        output.append(lines.get())
    text = "".join(output)
    assert text.index("Successfully loaded servable version") < text.index("Running gRPC")
    assert "server stopped" in text
