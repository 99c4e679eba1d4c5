"""TF Serving's REST API for `cascade serve --rest_api_port`, on the standard library's server.

    POST /v1/models/NAME[/versions/N | /labels/L]:predict   {"instances": ...} or {"inputs": ...}
    GET  /v1/models/NAME[/versions/N | /labels/L]           model status
    GET  /v1/models/NAME[/versions/N | /labels/L]/metadata  signature_def metadata

Bodies follow serving/model_server/json_tensor.py; status and metadata are the protos printed as TF Serving
prints them; errors are `{"error": "..."}` with the HTTP code TF Serving maps each gRPC code to.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import logging
import re
import socket
import threading
import time
import urllib.parse

from google.protobuf import json_format
from grpc import StatusCode
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2

from serving.model_server import json_tensor
from serving.model_server.model_manager import ModelManager
from serving.model_server.servable import SERVING_DEFAULT
from serving.model_server.status import ServingError, truncate

log = logging.getLogger(__name__)

# TF Serving's kPredictionApiGegex and kModelStatusApiRegex (http_rest_api_util.cc).
_VERSION = r"(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
_PREDICT = re.compile(r"/v1/models/([^/:]+)" + _VERSION + r":(classify|regress|predict)",
                      re.IGNORECASE)
_STATUS = re.compile(r"/v1/models(?:/([^/:]+))?" + _VERSION + r"(?:/(metadata))?", re.IGNORECASE)


def _invalid(message: str) -> ServingError:
    return ServingError(StatusCode.INVALID_ARGUMENT, message)


def _error_body(message: str) -> str:
    return json.dumps({"error": truncate(message)}, ensure_ascii=False)


class RestApi:
    """Answers one REST request with (HTTP status, JSON text); it knows nothing of sockets."""

    def __init__(self, manager: ModelManager, timeout_seconds: float = 30.0):
        self.manager = manager
        self.timeout_seconds = timeout_seconds

    def respond(self, method: str, path: str, body: bytes) -> tuple[int, str]:
        try:
            return 200, self._dispatch(method, urllib.parse.urlsplit(path).path, body)
        except ServingError as error:
            return error.http_status, _error_body(error.message)
        except RecursionError:
            return 400, _error_body("JSON Parse error: the document is nested too deeply")
        except Exception as error:  # a bug must not take the server down: answer 500, log it
            log.exception("REST %s %s failed", method, path)
            return 500, _error_body(f"{type(error).__name__}: {error}")

    def _dispatch(self, method: str, path: str, body: bytes) -> str:
        if not re.match(r"/v1/", path, re.IGNORECASE):
            raise ServingError(StatusCode.NOT_FOUND, f"Not found: {path}")
        pattern = {"POST": _PREDICT, "GET": _STATUS}.get(method)
        match = pattern.fullmatch(path) if pattern else None
        if match is None:
            raise _invalid(f"Malformed request: {method} {path}")
        name, version, label, action = match.groups()
        spec = model_pb2.ModelSpec(name=urllib.parse.unquote(name or ""))
        if version is not None:
            if int(version) >= 2**63:
                raise _invalid(f"Failed to convert version: {version} to numeric.")
            spec.version.value = int(version)
        if label is not None:
            spec.version_label = urllib.parse.unquote(label)
        if method == "POST":
            if action.lower() != "predict":
                raise ServingError(StatusCode.UNIMPLEMENTED, f"{action.lower()} is not "
                                   "implemented by cascade serve; use predict")
            return self._predict(spec, body)
        if not spec.name:
            raise _invalid("Missing model name in request.")
        if action:
            return self._metadata(spec)
        return json_format.MessageToJson(self.manager.status(spec),
                                         always_print_fields_with_no_presence=True)

    def _metadata(self, spec: model_pb2.ModelSpec) -> str:
        with self.manager.handle(spec) as servable:
            signatures = get_model_metadata_pb2.SignatureDefMap(
                signature_def=servable.signature_defs)
            response_spec = model_pb2.ModelSpec(name=servable.name)
            response_spec.version.value = servable.version

        def text(message) -> str:  # TF Serving prints the two parts apart and joins them
            return json_format.MessageToJson(message, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)

        return ('{\n"model_spec":' + text(response_spec) + ',\n"metadata": {"signature_def": '
                + text(signatures) + "}\n}\n")

    def _predict(self, spec: model_pb2.ModelSpec, body: bytes) -> str:
        deadline = time.monotonic() + self.timeout_seconds
        if not body.strip():
            raise _invalid("JSON Parse error: The document is empty")
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise _invalid(f"JSON Parse error: {error}") from error
        debug = json_tensor.debug_string(document)
        if not isinstance(document, dict):
            raise _invalid(f"JSON Value: {debug} Is not object")
        signature_name = document.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise _invalid(f"JSON Value: {debug} not formatted correctly. 'signature_name' key "
                           "must be a string value.")
        spec.signature_name = signature_name
        with self.manager.handle(spec) as servable:
            signature = servable.signature_defs.get(signature_name or SERVING_DEFAULT)
            if signature is None:
                raise _invalid(f'Serving signature name: "{signature_name or SERVING_DEFAULT}" '
                               "not found in signature def")
            if not signature.inputs:
                raise _invalid("Failed to get input map for signature: "
                               f"{signature_name or 'DEFAULT'}")
            if "instances" in document and "inputs" in document:
                raise _invalid(f"JSON Value: {debug} Not formatted correctly expecting only one "
                               "of 'inputs' or 'instances' keys to exist ")
            if "instances" in document:
                instances = document["instances"]
                if not isinstance(instances, list):
                    raise _invalid(f"JSON Value: {debug} Expecting 'instances' to be an list/array")
                if not instances:
                    raise _invalid(f"JSON Value: {debug} No values in 'instances' array")
                arrays = json_tensor.instances_to_arrays(instances, signature.inputs)
            elif "inputs" in document:
                arrays = json_tensor.inputs_to_arrays(document["inputs"], signature.inputs)
            else:
                raise _invalid("Missing 'inputs' or 'instances' key")
            _, outputs = self.manager.predict_on(servable, spec, arrays, deadline=deadline)
        return json_tensor.arrays_to_json(outputs, row_format="instances" in document)


# ----------------------------------------------------------------------------- the HTTP server

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving's server
    server_version = "cascade-serve"

    def do_GET(self):  # noqa: N802 (http.server's names)
        self._answer("GET")

    def do_POST(self):  # noqa: N802
        self._answer("POST")

    def do_PUT(self):  # noqa: N802
        self._answer("PUT")

    def do_DELETE(self):  # noqa: N802
        self._answer("DELETE")

    def _answer(self, method: str) -> None:
        try:
            body = self._body()
        except (ValueError, OSError) as error:
            self._send(400, _error_body(f"cannot read the request body: {error}"))
            self.close_connection = True
            return
        self._send(*self.server.owner.respond(method, self.path, body))

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            for _ in range(1 << 20):  # bounded: at most a million chunks
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            raise ValueError("too many chunks")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length < 2**31:
            raise ValueError(f"Content-Length {length} is out of range")
        return self.rfile.read(length)

    def _send(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        log.debug("%s - %s", self.address_string(), format % args)


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection must not hold up shutdown


class _HttpServer6(_HttpServer):
    address_family = socket.AF_INET6


class RestServer:
    """The REST port: a thread per connection; each request runs under the REST timeout."""

    def __init__(self, api: RestApi, host: str, port: int, num_threads: int = 16):
        self._httpd = (_HttpServer6 if ":" in host else _HttpServer)((host, port), _Handler)
        self._httpd.owner = self
        self._api = api
        self._workers = concurrent.futures.ThreadPoolExecutor(num_threads, "rest")
        self._in_flight = 0
        self._idle = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="rest", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> "RestServer":
        self._thread.start()
        return self

    def respond(self, method: str, path: str, body: bytes) -> tuple[int, str]:
        with self._idle:
            if self._stopping:
                return 503, _error_body("Server is shutting down")
            self._in_flight += 1
        try:
            future = self._workers.submit(self._api.respond, method, path, body)
            try:  # the deadline is also enforced inside; this bounds a model call that overruns
                return future.result(timeout=self._api.timeout_seconds)
            except concurrent.futures.TimeoutError:
                return 504, _error_body("Deadline Exceeded")
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def refuse(self) -> None:
        """Stops accepting connections and answers 503 to requests on open ones."""
        with self._idle:
            if self._stopping:
                return
            self._stopping = True
        self._httpd.shutdown()

    def stop(self, grace: float = 5.0) -> None:
        """Refuses new requests, lets in-flight ones finish (up to `grace` seconds), closes."""
        self.refuse()
        end = time.monotonic() + grace
        with self._idle:
            while self._in_flight and time.monotonic() < end:
                self._idle.wait(max(0.0, min(0.5, end - time.monotonic())))
        self._httpd.server_close()
        self._workers.shutdown(wait=False, cancel_futures=True)
