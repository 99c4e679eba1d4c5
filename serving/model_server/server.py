"""`cascade serve`: a TF-Serving-compatible model server over a model base path (docs/design.md).

gRPC `tensorflow.serving.PredictionService` (Predict, GetModelMetadata; Classify, Regress and
MultiInference answer UNIMPLEMENTED) and `ModelService` (GetModelStatus,
HandleReloadConfigRequest), the optional gRPC health service, and the REST API, under TF
Serving's flag names. Versions are polled and swapped (model_manager.py); `--enable_batching`
merges concurrent requests (batching.py). Ports open once the initial models are AVAILABLE.

    options = ServerOptions(server_config.config_for_base_path("models"), port=0, rest_api_port=0)
    with Server(options).start() as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import logging
import os
import pathlib
import signal
import sys
import threading
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc
from grpc import StatusCode
from tensorflow_serving.apis import get_model_metadata_pb2, model_management_pb2
from tensorflow_serving.apis import model_service_pb2_grpc, predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving.model_server import config as server_config
from serving.model_server.batching import Batcher
from serving.model_server.health import HealthService
from serving.model_server.model_manager import ModelManager
from serving.model_server.rest import RestApi, RestServer
from serving.model_server.servable import tensor_proto
from serving.model_server.config import BatchingParameters, ServerConfigError, TlsConfig
from serving.model_server.status import ServingError, truncate

log = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1  # the largest message TF Serving accepts
NO_DEADLINE = 1e8  # seconds; gRPC reports ~9e18 remaining for a call without a deadline


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """Everything `cascade serve` needs; `options_from_args` maps TF Serving's flags onto it."""

    model_config: server_config.ModelServerConfig
    host: str = "127.0.0.1"  # loopback unless asked (TF Serving listens on every interface)
    port: int = 8500  # gRPC; 0 picks a free port
    rest_api_port: int | None = 8501  # None: no REST; 0 picks a free port
    batching: BatchingParameters | None = None  # None: no server-side batching
    file_system_poll_wait_seconds: float = 1.0  # <= 0: versions are looked for once, at start
    model_config_file: str | None = None  # re-read when model_config_file_poll_wait_seconds > 0
    model_config_file_poll_wait_seconds: float = 0.0
    tls: TlsConfig | None = None  # gRPC over TLS
    rest_api_timeout_in_ms: int = 30_000
    rest_api_num_threads: int | None = None  # default: 4 per core, at least 16
    grpc_max_threads: int | None = None  # default: 4 per core, at least 32, 2 per batch row
    num_request_iterations_for_warmup: int = 1  # 0 turns warmup off
    enable_grpc_healthcheck_service: bool = False
    allow_version_labels_for_unavailable_models: bool = False


# ----------------------------------------------------------------------------- gRPC services

def _rpc(method):
    """Answers a ServingError with its code and (cut) message; anything else is INTERNAL."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServingError as error:
            context.abort(error.code, truncate(error.message))
        except Exception as error:  # keep serving; the traceback goes to the log
            log.exception("%s failed", method.__name__)
            context.abort(StatusCode.INTERNAL, truncate(f"{type(error).__name__}: {error}"))
    return wrapper


def _require_spec(request) -> None:
    if not request.HasField("model_spec"):
        raise ServingError(StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")


def _unimplemented(name: str) -> ServingError:
    return ServingError(StatusCode.UNIMPLEMENTED, f"{name} is not implemented by cascade serve; "
                        "use Predict")


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    @_rpc
    def Predict(self, request, context):  # noqa: N802 (gRPC's method names)
        _require_spec(request)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining < NO_DEADLINE else None
        spec, outputs = self.manager.predict(request.model_spec, request.inputs,
                                             request.output_filter, deadline)
        response = predict_pb2.PredictResponse(model_spec=spec)
        for alias, array in outputs.items():
            response.outputs[alias].CopyFrom(tensor_proto(array))
        return response

    @_rpc
    def GetModelMetadata(self, request, context):  # noqa: N802
        _require_spec(request)
        if not request.metadata_field:
            raise ServingError(StatusCode.INVALID_ARGUMENT,
                               "GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise ServingError(StatusCode.INVALID_ARGUMENT,
                                   f"Metadata field {field} is not supported")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        with self.manager.handle(request.model_spec) as servable:
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].Pack(
                get_model_metadata_pb2.SignatureDefMap(signature_def=servable.signature_defs))
        return response

    @_rpc
    def Classify(self, request, context):  # noqa: N802
        raise _unimplemented("Classify")

    @_rpc
    def Regress(self, request, context):  # noqa: N802
        raise _unimplemented("Regress")

    @_rpc
    def MultiInference(self, request, context):  # noqa: N802
        raise _unimplemented("MultiInference")


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    @_rpc
    def GetModelStatus(self, request, context):  # noqa: N802
        _require_spec(request)
        return self.manager.status(request.model_spec)

    @_rpc
    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        if request.config.WhichOneof("config") != "model_config_list":
            raise ServingError(StatusCode.INVALID_ARGUMENT, "ServerModelConfig type not supported "
                               "by HandleReloadConfigRequest. Only ModelConfigList is currently "
                               "supported")
        self.manager.reload_config(request.config)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.SetInParent()  # error_code OK
        return response


# ----------------------------------------------------------------------------- the server

def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    """The model server in this process: `start()` loads the models, then opens the ports."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.manager: ModelManager | None = None
        self.batcher: Batcher | None = None
        self.health = HealthService()
        self._grpc: grpc.Server | None = None
        self._rest: RestServer | None = None
        self._grpc_port = 0
        self._stop_lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()  # set once new gRPC requests are refused
        self._config_poller: threading.Thread | None = None

    @property
    def grpc_port(self) -> int:
        return self._grpc_port

    @property
    def rest_port(self) -> int | None:
        return self._rest.port if self._rest is not None else None

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Server":
        """Loads the initial models (raises ServingError if one fails), then serves."""
        options = self.options
        if options.batching is not None:
            self.batcher = Batcher(options.batching).start()
        self.manager = ModelManager(
            options.model_config, poll_seconds=options.file_system_poll_wait_seconds,
            batcher=self.batcher, warmup_iterations=options.num_request_iterations_for_warmup,
            allow_labels_for_unavailable_models=options.allow_version_labels_for_unavailable_models)
        try:
            self.manager.start()
            self._start_grpc()
            if options.rest_api_port is not None:
                self._start_rest()
        except BaseException:
            self.stop(grace=0)
            raise
        self.health.set_serving(True)
        if options.model_config_file and options.model_config_file_poll_wait_seconds > 0:
            self._config_poller = threading.Thread(target=self._poll_config_file,
                                                   name="config-poller", daemon=True)
            self._config_poller.start()
        return self

    def _start_grpc(self) -> None:
        options = self.options
        batch_rows = options.batching.max_batch_size if options.batching else 0
        threads = options.grpc_max_threads or max(32, 4 * (os.cpu_count() or 1), 2 * batch_rows)
        self._grpc = grpc.server(
            concurrent.futures.ThreadPoolExecutor(min(threads, 1024), thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", INT32_MAX),
                     ("grpc.max_send_message_length", INT32_MAX),
                     ("grpc.so_reuseport", 0)])  # a port in use is an error, not shared
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(self.manager), self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(self.manager),
                                                                  self._grpc)
        if options.enable_grpc_healthcheck_service:
            self._grpc.add_generic_rpc_handlers((self.health.handler(),))
        address = _address(options.host, options.port)
        try:
            if options.tls is not None:
                tls = options.tls
                credentials = grpc.ssl_server_credentials(
                    [(tls.server_key, tls.server_cert)], root_certificates=tls.custom_ca,
                    require_client_auth=tls.client_verify)
                self._grpc_port = self._grpc.add_secure_port(address, credentials)
            else:
                self._grpc_port = self._grpc.add_insecure_port(address)
        except RuntimeError as error:
            raise ServingError(StatusCode.UNAVAILABLE,
                               f"cannot listen on {address}: {error}") from error
        if not self._grpc_port:
            raise ServingError(StatusCode.UNAVAILABLE, f"cannot listen on {address}")
        self._grpc.start()
        log.info("Running gRPC ModelServer at %s ...", _address(options.host, self._grpc_port))

    def _start_rest(self) -> None:
        options = self.options
        api = RestApi(self.manager, options.rest_api_timeout_in_ms / 1000)
        threads = options.rest_api_num_threads or max(16, 4 * (os.cpu_count() or 1))
        address = _address(options.host, options.rest_api_port)
        try:
            self._rest = RestServer(api, options.host, options.rest_api_port, threads).start()
        except OSError as error:
            raise ServingError(StatusCode.UNAVAILABLE,
                               f"cannot listen on {address}: {error}") from error
        log.info("Exporting HTTP/REST API at:%s ...", _address(options.host, self._rest.port))

    def _poll_config_file(self) -> None:
        path = pathlib.Path(self.options.model_config_file)
        last = path.read_text() if path.exists() else None
        while not self._stopped.wait(self.options.model_config_file_poll_wait_seconds):
            try:
                text = path.read_text()
                if text != last:
                    last = text
                    self.manager.reload_config(server_config.read_model_server_config(path))
                    log.info("reloaded the model config from %s", path)
            except (OSError, ServerConfigError, ServingError) as error:
                log.error("model config %s not reloaded: %s", path, error)

    def stop(self, grace: float | None = 5.0) -> None:
        """Takes no new requests, lets in-flight ones finish (up to `grace` s), unloads."""
        with self._stop_lock:
            if self._stopping:
                return
            self._stopping = True
        grace = grace or 0.0
        self.health.set_serving(False)
        grpc_done = self._grpc.stop(grace) if self._grpc is not None else None  # refuses new RPCs
        if self._rest is not None:
            self._rest.refuse()
        self._stopped.set()
        if grpc_done is not None:
            grpc_done.wait(grace + 5.0)
        if self._rest is not None:
            self._rest.stop(grace)
        if self.batcher is not None:
            self.batcher.stop(timeout=grace + 5.0)
        if self.manager is not None:
            self.manager.stop(timeout=grace + 5.0)
        if self._config_poller is not None:
            self._config_poller.join(5.0)
        log.info("server stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until `stop()` refuses new requests (or `timeout` passes); True if so."""
        return self._stopped.wait(timeout)


# ----------------------------------------------------------------------------- command line

def _tls(args: argparse.Namespace) -> TlsConfig | None:
    if args.ssl_config_file and (args.tls_cert or args.tls_key):
        raise ServerConfigError("give --ssl_config_file or --tls-cert/--tls-key, not both")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ServerConfigError("--tls-cert and --tls-key go together")
    if args.ssl_config_file:
        return server_config.read_ssl_config(args.ssl_config_file)
    if args.tls_cert:
        return server_config.tls_from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
    return None


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """ServerOptions from parsed flags; ServerConfigError names the flag or file that is wrong."""
    if args.model_config_file:
        if args.model_base_path:
            log.warning("--model_config_file is set: --model-base-path %s is ignored",
                        args.model_base_path)
        config = server_config.read_model_server_config(args.model_config_file)
    elif args.model_base_path:
        config = server_config.config_for_base_path(args.model_base_path, args.model_name)
    else:
        raise ServerConfigError("give --model-base-path DIR or --model_config_file FILE")
    batching = None
    if args.enable_batching:
        batching = (server_config.read_batching_parameters(args.batching_parameters_file)
                    if args.batching_parameters_file else BatchingParameters())
    elif args.batching_parameters_file:
        log.warning("--batching_parameters_file is ignored without --enable_batching")
    warmup = args.num_request_iterations_for_warmup if args.enable_model_warmup else 0
    any_label = args.allow_version_labels_for_unavailable_models
    return ServerOptions(
        model_config=config, host=args.host, port=args.port,
        rest_api_port=args.rest_api_port or None, batching=batching,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        model_config_file=args.model_config_file,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        tls=_tls(args), rest_api_timeout_in_ms=args.rest_api_timeout_in_ms,
        rest_api_num_threads=args.rest_api_num_threads, grpc_max_threads=args.grpc_max_threads,
        num_request_iterations_for_warmup=warmup,
        enable_grpc_healthcheck_service=args.enable_grpc_healthcheck_service,
        allow_version_labels_for_unavailable_models=any_label)


def run(args: argparse.Namespace) -> int:
    """Serves until SIGTERM or SIGINT, then finishes in-flight requests: 0; 1 if it cannot start."""
    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        try:
            server = Server(options_from_args(args)).start()
        except (ServerConfigError, ServingError, OSError) as error:
            log.error("cannot start the model server: %s", error)
            return 1
        while not stop.wait(1.0):
            pass
        log.info("signal received: finishing in-flight requests")
        server.stop(grace=30.0)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.model_server.server ...`, the same as `cascade serve ...`."""
    parser = argparse.ArgumentParser(prog="cascade serve", description=__doc__.split("\n\n")[0])
    server_config.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
