"""The models behind `cascade serve`: which versions are loaded, their states, and the request
path to them. It plays TF Serving's ServerCore and AspiredVersionsManager.

Each poll lists every model's integer version directories, applies the model's version policy
(the aspired versions) and acts one version at a time with TF Serving's availability-preserving
policy: a version that is no longer aspired is unloaded only once an aspired one is AVAILABLE (or
nothing is aspired any more), and a new aspired version loads beside the old one. An unloading
version takes no new requests and is freed once its in-flight ones are done, so a swap fails no
request. A version that fails to load or to warm up ends in state END with its error, and is not
retried while it stays aspired; whatever served before keeps serving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import threading
from typing import Iterator, Mapping

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf
from google.protobuf import message as protobuf_message
from grpc import StatusCode
from tensorflow_serving.apis import get_model_status_pb2, model_pb2, prediction_log_pb2

from serving.model_server import config as server_config
from serving.model_server import servable as servable_lib
from serving.model_server.batching import Batcher
from serving.model_server.servable import Servable, Tensors
from serving.model_server.status import ServingError

log = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus  # State.START, LOADING, AVAILABLE, UNLOADING, END
WARMUP_FILE = pathlib.Path("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving's WarmupConsts::kMaxNumRecords
StatusResponse = get_model_status_pb2.GetModelStatusResponse


@dataclasses.dataclass
class _Version:
    state: int
    servable: Servable | None = None
    error: ServingError | None = None
    failed: bool = False  # a failed load is not retried while the version stays aspired


def _model_names(config: server_config.ModelServerConfig) -> set[str]:
    return {entry.name for entry in config.model_config_list.config}


class ModelManager:
    """Loads, serves and unloads the versions a `ModelServerConfig` asks for."""

    def __init__(self, config: server_config.ModelServerConfig, *, poll_seconds: float = 1.0,
                 batcher: Batcher | None = None, warmup_iterations: int = 1,
                 allow_labels_for_unavailable_models: bool = False):
        server_config.validate_model_server_config(config)
        self._config = config
        self.poll_seconds = poll_seconds  # <= 0: versions are looked for once, at start
        self._batcher = batcher
        self._warmup_iterations = warmup_iterations  # 0 turns warmup off
        self._allow_unavailable_labels = allow_labels_for_unavailable_models
        self._versions: dict[str, dict[int, _Version]] = {}
        self._labels: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()  # guards _versions and _labels; held only briefly
        self._reconcile_lock = threading.Lock()  # one round of load/unload decisions at a time
        self._stop = threading.Event()  # no more polling
        self._abandon = threading.Event()  # unloads stop waiting for in-flight requests
        self._poller: threading.Thread | None = None
        self._unloaders: list[threading.Thread] = []

    # -- lifecycle

    def start(self) -> None:
        """Loads the initial versions (raises if one fails: TF Serving exits then), then polls."""
        with self._reconcile_lock:
            self._check_base_paths(self._config)
            self._reconcile_all()
            self._raise_failures(_model_names(self._config))
            self._update_labels(self._config)
        if self.poll_seconds > 0:
            self._poller = threading.Thread(target=self._poll, name="model-poller", daemon=True)
            self._poller.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops polling and unloads everything, waiting up to `timeout` for in-flight requests."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout)
        with self._reconcile_lock:
            for name, records in list(self._versions.items()):
                for version, record in list(records.items()):
                    if record.state == State.AVAILABLE:
                        self._unload(name, version)
        for thread in self._unloaders:
            thread.join(timeout)
        self._abandon.set()
        for thread in self._unloaders:
            thread.join(1.0)

    def reload_config(self, config: server_config.ModelServerConfig) -> None:
        """Replaces the whole model list (HandleReloadConfigRequest): waits for new models to
        load, unloads the models it no longer names, then installs its version labels."""
        try:
            server_config.validate_model_server_config(config, source="ReloadConfigRequest")
        except server_config.ServerConfigError as error:
            raise ServingError(StatusCode.INVALID_ARGUMENT, str(error)) from error
        with self._reconcile_lock:
            self._check_base_paths(config)
            added = _model_names(config) - _model_names(self._config)
            self._config = config
            self._reconcile_all()
            self._raise_failures(added)
            self._update_labels(config)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            with self._reconcile_lock:
                if self._stop.is_set():
                    return
                self._reconcile_all()

    # -- reconciliation (reconcile lock held)

    @staticmethod
    def _check_base_paths(config) -> None:
        for entry in config.model_config_list.config:
            if not pathlib.Path(entry.base_path).is_dir():
                raise ServingError(StatusCode.INVALID_ARGUMENT, "Could not find base path "
                                   f"{entry.base_path} for servable {entry.name}")

    def _raise_failures(self, names: set[str]) -> None:
        with self._lock:
            failures = [f"{{name: {name} version: {v}}}: {r.error}" for name in sorted(names)
                        for v, r in self._versions.get(name, {}).items() if r.failed]
        if failures:
            raise ServingError(StatusCode.UNKNOWN,
                               "Some servables failed to load: " + "; ".join(failures))

    def _update_labels(self, config) -> None:
        """TF Serving only lets a label name an AVAILABLE version (unless told otherwise)."""
        labels = {}
        with self._lock:
            for entry in config.model_config_list.config:
                for label, version in entry.version_labels.items():
                    record = self._versions.get(entry.name, {}).get(version)
                    available = record is not None and record.state == State.AVAILABLE
                    if not available and not self._allow_unavailable_labels:
                        raise ServingError(StatusCode.FAILED_PRECONDITION,
                                           f"Request to assign label to version {version} of model "
                                           f"{entry.name}, which is not currently available for "
                                           "inference")
                    labels.setdefault(entry.name, {})[label] = version
            self._labels = labels

    def _reconcile_all(self) -> None:
        entries = {entry.name: entry for entry in self._config.model_config_list.config}
        for name in sorted(set(entries) | set(self._versions)):
            try:
                self._reconcile(name, entries.get(name))
            except Exception:  # one model's trouble must not stop the others; the next poll retries
                log.exception("polling model %s failed", name)

    def _reconcile(self, name: str, entry) -> None:
        on_disk: dict[int, pathlib.Path] = {}
        if entry is not None:
            try:
                on_disk = server_config.versions_on_disk(entry.base_path)
            except OSError as error:
                log.error("Could not find base path %s for servable %s: %s",
                          entry.base_path, name, error)
                return
            if not on_disk:
                log.warning("No versions of servable %s found under base path %s. Did you forget "
                            "to name your leaf directory as a number (eg. '/1/')?",
                            name, entry.base_path)
        aspired = server_config.aspired_versions(entry, on_disk) if entry is not None else set()
        with self._lock:
            records = self._versions.setdefault(name, {})
            for version, record in records.items():
                if record.failed and version not in aspired:
                    record.failed = False  # gone: if it comes back it is a new attempt
        for _ in range(2 * (len(records) + len(aspired)) + 1):  # each action settles a version
            action = self._next_action(name, aspired)
            if action is None:
                return
            kind, version = action
            if kind == "unload":
                self._unload(name, version)
            else:
                self._load(name, version, on_disk[version])

    def _next_action(self, name: str, aspired: set[int]) -> tuple[str, int] | None:
        """TF Serving's AvailabilityPreservingPolicy::GetNextAction."""
        with self._lock:
            records = self._versions[name]
            serving = {v for v, r in records.items() if r.state == State.AVAILABLE}
            unaspired_serving = sorted(serving - aspired)
            if unaspired_serving and (not aspired or serving & aspired
                                      or len(unaspired_serving) > 1):
                return "unload", unaspired_serving[0]
            new = [v for v in aspired if v not in records
                   or (records[v].state == State.END and not records[v].failed)]
            return ("load", max(new)) if new else None

    def _load(self, name: str, version: int, path: pathlib.Path) -> None:
        with self._lock:
            self._versions[name][version] = _Version(State.LOADING)
        log.info("Loading servable version {name: %s version: %d} from %s", name, version, path)
        try:
            servable = servable_lib.load_servable(name, version, path)
            self._warmup(servable)
        except Exception as error:  # whatever went wrong fails this version only
            failure = ServingError.from_exception(error)
            log.error("Loading servable version {name: %s version: %d} failed: %s",
                      name, version, failure)
            with self._lock:
                self._versions[name][version] = _Version(State.END, error=failure, failed=True)
            return
        with self._lock:
            self._versions[name][version] = _Version(State.AVAILABLE, servable=servable)
        log.info("Successfully loaded servable version {name: %s version: %d}", name, version)

    def _unload(self, name: str, version: int) -> None:
        """Takes the version out of service now; frees it once its in-flight requests are done."""
        with self._lock:
            record = self._versions[name][version]
            record.state = State.UNLOADING
        thread = threading.Thread(target=self._finish_unload, args=(name, version, record),
                                  name=f"unload-{name}-{version}", daemon=True)
        self._unloaders = [t for t in self._unloaders if t.is_alive()] + [thread]
        thread.start()

    def _finish_unload(self, name: str, version: int, record: _Version) -> None:
        servable = record.servable
        servable.wait_idle(self._abandon)
        if self._batcher is not None:
            self._batcher.drop(servable)
        servable.release()
        with self._lock:
            if self._versions[name].get(version) is record:
                self._versions[name][version] = _Version(State.END)
        log.info("Done unloading servable version {name: %s version: %d}", name, version)

    def _warmup(self, servable: Servable) -> None:
        """Replays assets.extra/tf_serving_warmup_requests (PredictionLog records) on a version
        that is loading; any failing request fails the version."""
        path = servable.path / WARMUP_FILE
        if not path.exists() or self._warmup_iterations < 1:
            return
        records = []
        for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            if len(records) == MAX_WARMUP_RECORDS:
                raise ServingError(StatusCode.INVALID_ARGUMENT, "Number of warmup records exceeds "
                                   f"the maximum ({MAX_WARMUP_RECORDS}) at {path}")
            records.append(record)
        for record in records:
            entry = prediction_log_pb2.PredictionLog()
            try:
                entry.ParseFromString(record)
            except protobuf_message.DecodeError as error:
                raise ServingError(StatusCode.INVALID_ARGUMENT,
                                   f"Failed to parse warmup record from {path}") from error
            if entry.WhichOneof("log_type") != "predict_log":
                log.warning("%s: skipping a %s warmup record; cascade serve replays predict_log "
                            "only", path, entry.WhichOneof("log_type"))
                continue
            request = entry.predict_log.request
            for _ in range(self._warmup_iterations):
                self.predict_on(servable, request.model_spec, request.inputs,
                                request.output_filter, batching=False)
        log.info("Finished reading warmup data for model at %s. Number of warmup records read: "
                 "%d.", path, len(records))

    # -- requests

    @contextlib.contextmanager
    def handle(self, model_spec: model_pb2.ModelSpec) -> Iterator[Servable]:
        """The AVAILABLE version a ModelSpec names, held (it cannot unload) for the block."""
        servable = self._acquire(model_spec)
        try:
            yield servable
        finally:
            servable.leave()

    def _acquire(self, spec: model_pb2.ModelSpec) -> Servable:
        name = spec.name
        if not name:
            raise ServingError(StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
        choice = spec.WhichOneof("version_choice")
        with self._lock:
            records = self._versions.get(name, {})
            if choice == "version_label":
                version = self._labels.get(name, {}).get(spec.version_label)
                if version is None:
                    raise ServingError(StatusCode.INVALID_ARGUMENT,
                                       f"Unrecognized servable version label: {spec.version_label}")
                request = f"Specific({name}, {version})"
            elif choice == "version":
                version = spec.version.value
                request = f"Specific({name}, {version})"
            else:
                available = [v for v, r in records.items() if r.state == State.AVAILABLE]
                version = max(available, default=None)
                request = f"Latest({name})"
            record = records.get(version)
            if record is None or record.state != State.AVAILABLE:
                raise ServingError(StatusCode.NOT_FOUND,
                                   f"Servable not found for request: {request}")
            record.servable.enter()
            return record.servable

    def servable(self, name: str, version: int) -> Servable | None:
        """The loaded servable of a version if it is AVAILABLE (for inspection and tests)."""
        with self._lock:
            record = self._versions.get(name, {}).get(version)
            available = record is not None and record.state == State.AVAILABLE
            return record.servable if available else None

    def predict(self, model_spec: model_pb2.ModelSpec, inputs: Mapping, output_filter=(),
                deadline: float | None = None) -> tuple[model_pb2.ModelSpec, Tensors]:
        """Predict as TF Serving runs it: the response's ModelSpec and the output arrays."""
        with self.handle(model_spec) as servable:
            return self.predict_on(servable, model_spec, inputs, output_filter, deadline)

    def predict_on(self, servable: Servable, model_spec: model_pb2.ModelSpec, inputs: Mapping,
                   output_filter=(), deadline: float | None = None,
                   batching: bool = True) -> tuple[model_pb2.ModelSpec, Tensors]:
        """Predict on a held servable, through the batcher when batching is on."""
        return servable_lib.predict(servable, model_spec, inputs, output_filter, deadline,
                                    self._batcher if batching else None)

    def status(self, model_spec: model_pb2.ModelSpec) -> StatusResponse:
        """GetModelStatus: every version's state (highest first), or the one version named."""
        response = StatusResponse()
        name = model_spec.name
        with self._lock:
            records = self._versions.get(name, {})
            if model_spec.WhichOneof("version_choice") == "version":
                version = model_spec.version.value
                if version not in records:
                    raise ServingError(StatusCode.NOT_FOUND,
                                       f"Could not find version {version} of model {name}")
                chosen = [(version, records[version])]
            else:  # a version label is ignored here, as TF Serving ignores it
                if not records:
                    raise ServingError(StatusCode.NOT_FOUND,
                                       f"Could not find any versions of model {name}")
                chosen = sorted(records.items(), reverse=True)
            for version, record in chosen:
                entry = response.model_version_status.add(version=version, state=record.state)
                entry.status.SetInParent()  # TF Serving always sends the status, OK included
                if record.error is not None:
                    entry.status.error_code = record.error.code.value[0]
                    entry.status.error_message = record.error.message
        return response
