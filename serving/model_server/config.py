"""What `cascade serve` serves and how: the `ModelServerConfig` (models.config), the version
policy over a model's base path, the batching parameters file and the TLS settings.

TF Serving's `BatchingParameters` and `SSLConfig` text protos are not in `tensorflow-serving-api`,
so the two messages are declared here with TF Serving's field names and numbers and parsed with
`text_format`, which reports the line and column of any mistake.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import re
import tempfile

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf import wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default"
CONFIG_FILE = "models.config"
_VERSION_DIR = re.compile(r"[0-9]+")
ModelServerConfig = model_server_config_pb2.ModelServerConfig


class ServerConfigError(ValueError):
    """A configuration file or flag is wrong; the message names the file, field or path."""


# ----------------------------------------------------------------------------- models.config

def read_model_server_config(path: str | os.PathLike) -> ModelServerConfig:
    """Parses a `ModelServerConfig` text proto (what `--model_config_file` names)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ServerConfigError(f"cannot read model config file {path}: {error}") from error
    config = ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ServerConfigError(f"{path}:{error}") from error
    validate_model_server_config(config, source=str(path))
    return config


def config_for_base_path(base_path: str | os.PathLike,
                         model_name: str = DEFAULT_MODEL_NAME) -> ModelServerConfig:
    """The config for `--model-base-path DIR`: DIR/models.config when present (the `cascade
    export` layout), else DIR as one model's base path (integer version directories in it)."""
    base = pathlib.Path(base_path).resolve()
    if not base.is_dir():
        raise ServerConfigError(f"model base path {base} is not a directory")
    config_file = base / CONFIG_FILE
    if config_file.exists():
        config = read_model_server_config(config_file)
        for entry in config.model_config_list.config:
            # An export copied from elsewhere keeps its absolute paths; its folders are here.
            if not pathlib.Path(entry.base_path).is_dir() and (base / entry.name).is_dir():
                log.warning("%s: base_path %s of model %s does not exist; using %s",
                            config_file, entry.base_path, entry.name, base / entry.name)
                entry.base_path = str(base / entry.name)
        return config
    if not versions_on_disk(base):
        raise ServerConfigError(f"{base} has neither {CONFIG_FILE} nor integer version "
                                "directories: give the folder `cascade export` wrote, or one "
                                "model's base path")
    config = ModelServerConfig()
    entry = config.model_config_list.config.add()
    entry.name, entry.base_path, entry.model_platform = model_name, str(base), "tensorflow"
    return config


def validate_model_server_config(config: ModelServerConfig, source: str = "config") -> None:
    """What TF Serving checks before loading anything: a model list, unique names, base paths."""
    if config.WhichOneof("config") != "model_config_list":
        raise ServerConfigError(f"{source}: only model_config_list is supported")
    names = set()
    for index, entry in enumerate(config.model_config_list.config):
        if not entry.name:
            raise ServerConfigError(f"{source}: config entry {index} has no name")
        if entry.name in names:
            raise ServerConfigError(f"{source}: Illegal to list model {entry.name} multiple "
                                    "times in config list")
        if not entry.base_path:
            raise ServerConfigError(f"{source}: model {entry.name} has no base_path")
        if entry.model_platform not in ("", "tensorflow"):
            raise ServerConfigError(f"{source}: model {entry.name} has model_platform "
                                    f"{entry.model_platform!r}; only 'tensorflow' is served")
        names.add(entry.name)


# ----------------------------------------------------------------------------- versions on disk

_warned_dirs: set[pathlib.Path] = set()  # each non-version directory is reported once, not per poll


def versions_on_disk(base_path: str | os.PathLike) -> dict[int, pathlib.Path]:
    """{version: directory} for the integer-named directories under a model's base path; other
    directories (staging folders, `assets`) are ignored with one warning each."""
    found: dict[int, pathlib.Path] = {}
    for child in sorted(pathlib.Path(base_path).iterdir()):
        if not child.is_dir():
            continue
        if not _VERSION_DIR.fullmatch(child.name):
            if child not in _warned_dirs:
                _warned_dirs.add(child)
                log.warning("ignoring %s: not an integer version directory", child)
            continue
        version = int(child.name)
        if version in found:
            log.warning("Duplicate version directories detected. Version %d will be loaded from "
                        "%s, %s will be ignored.", version, child, found[version])
        found[version] = child
    return found


def aspired_versions(entry: model_server_config_pb2.ModelConfig, on_disk) -> set[int]:
    """The versions the model's `model_version_policy` asks for among those on disk."""
    on_disk = sorted(on_disk)
    policy = entry.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return set(on_disk)
    if choice == "specific":
        wanted = set(policy.specific.versions)
        if not wanted:
            log.warning("No specific versions requested for servable %s", entry.name)
        for version in sorted(wanted - set(on_disk)):
            log.warning("Version %d of servable %s, which was requested to be served as a "
                        "'specific' version in the servable's version policy, was not found in "
                        "the file system", version, entry.name)
        return wanted & set(on_disk)
    count = max(policy.latest.num_versions, 1) if choice == "latest" else 1
    return set(on_disk[-count:])


# ----------------------------------------------------------------------------- TF Serving's protos

_Field = descriptor_pb2.FieldDescriptorProto


def _message_class(name: str, fields: list[tuple[str, int, int, str]], repeated=()) -> type:
    """A tensorflow.serving.`name` message class from (field, number, type, type name) tuples,
    built in a private descriptor pool so that it can never clash with a real one."""
    file_proto = descriptor_pb2.FileDescriptorProto(
        name=f"cascade/{name}.proto", package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"])
    message = file_proto.message_type.add(name=name)
    for field, number, kind, type_name in fields:
        label = _Field.LABEL_REPEATED if field in repeated else _Field.LABEL_OPTIONAL
        added = message.field.add(name=field, number=number, type=kind, label=label,
                                  json_name=field)
        if type_name:
            added.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))


_INT64 = (_Field.TYPE_MESSAGE, ".google.protobuf.Int64Value")
# session_bundle_config.proto's BatchingParameters, same names and numbers.
_BatchingParametersProto = _message_class("BatchingParameters", [
    ("max_batch_size", 1, *_INT64),
    ("batch_timeout_micros", 2, *_INT64),
    ("max_enqueued_batches", 3, *_INT64),
    ("num_batch_threads", 4, *_INT64),
    ("thread_pool_name", 5, _Field.TYPE_MESSAGE, ".google.protobuf.StringValue"),
    ("allowed_batch_sizes", 6, _Field.TYPE_INT64, ""),
    ("pad_variable_length_inputs", 7, _Field.TYPE_BOOL, ""),
    ("enable_large_batch_splitting", 8, _Field.TYPE_MESSAGE, ".google.protobuf.BoolValue"),
    ("max_execution_batch_size", 9, *_INT64),
], repeated={"allowed_batch_sizes"})
# config/ssl_config.proto's SSLConfig.
_SSLConfigProto = _message_class("SSLConfig", [
    ("server_key", 1, _Field.TYPE_STRING, ""),
    ("server_cert", 2, _Field.TYPE_STRING, ""),
    ("custom_ca", 3, _Field.TYPE_STRING, ""),
    ("client_verify", 4, _Field.TYPE_BOOL, ""),
])


# ----------------------------------------------------------------------------- batching parameters

@dataclasses.dataclass(frozen=True)
class BatchingParameters:
    """Server-side batching (`--enable_batching`); unset fields take TF Serving's defaults."""

    max_batch_size: int = 1000  # rows per executed batch; a larger request is INVALID_ARGUMENT
    batch_timeout_micros: int = 0  # how long a batch waits for rows; 0: run when a thread is free
    max_enqueued_batches: int = 10  # per version and signature; beyond them: UNAVAILABLE
    num_batch_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()  # a batch is padded up to the next of these
    pad_variable_length_inputs: bool = False  # pad other dimensions to the batch's longest

    def __post_init__(self):
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) < 1:
                raise ServerConfigError(f"batching parameter {name} must be >= 1, "
                                        f"got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ServerConfigError("batching parameter batch_timeout_micros must be >= 0")
        sizes = self.allowed_batch_sizes
        if any(b <= a for a, b in zip(sizes, sizes[1:])) or (sizes and sizes[0] < 1):
            raise ServerConfigError("allowed_batch_sizes entries must be monotonically increasing")
        if sizes and sizes[-1] != self.max_batch_size:
            raise ServerConfigError("Last entry in allowed_batch_sizes must match max_batch_size; "
                                    f"last entry was {sizes[-1]}; expected {self.max_batch_size}")

    def to_text(self) -> str:
        """The text proto that TF Serving's `--batching_parameters_file` reads."""
        lines = [f"{name} {{ value: {getattr(self, name)} }}" for name in
                 ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                  "num_batch_threads")]
        lines += [f"allowed_batch_sizes: {size}" for size in self.allowed_batch_sizes]
        if self.pad_variable_length_inputs:
            lines.append("pad_variable_length_inputs: true")
        return "\n".join(lines) + "\n"


def parse_batching_parameters(text: str, source: str = "batching parameters") -> BatchingParameters:
    """Parses a BatchingParameters text proto (`max_batch_size { value: 128 }` ...)."""
    proto = _BatchingParametersProto()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as error:
        raise ServerConfigError(f"{source}:{error}") from error
    for ignored in ("thread_pool_name", "enable_large_batch_splitting", "max_execution_batch_size"):
        if proto.HasField(ignored):
            log.warning("%s: %s is not supported by cascade serve and is ignored", source, ignored)
    defaults = BatchingParameters()
    wrapped = {name: getattr(proto, name).value if proto.HasField(name) else getattr(defaults, name)
               for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                            "num_batch_threads")}
    try:
        return BatchingParameters(**wrapped, allowed_batch_sizes=tuple(proto.allowed_batch_sizes),
                                  pad_variable_length_inputs=proto.pad_variable_length_inputs)
    except ServerConfigError as error:
        raise ServerConfigError(f"{source}: {error}") from error


def read_batching_parameters(path: str | os.PathLike) -> BatchingParameters:
    """Reads `--batching_parameters_file`."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ServerConfigError(f"cannot read batching parameters file {path}: {error}") from error
    return parse_batching_parameters(text, source=str(path))


def write_batching_parameters(path: str | os.PathLike, max_batch_size: int = 128,
                              batch_timeout_micros: int = 0,
                              max_enqueued_batches: int | None = None,
                              num_batch_threads: int | None = None,
                              allowed_batch_sizes: tuple[int, ...] = (),
                              pad_variable_length_inputs: bool = False) -> pathlib.Path:
    """Writes a batching parameters file (atomically) whose defaults are TF Serving's advice for
    CPU serving: a batch thread per core, a large max batch, no batch timeout (then try 1-10 ms
    and measure), and for online serving as many enqueued batches as threads."""
    threads = num_batch_threads or os.cpu_count() or 1
    parameters = BatchingParameters(
        max_batch_size=max_batch_size, batch_timeout_micros=batch_timeout_micros,
        max_enqueued_batches=max_enqueued_batches or threads, num_batch_threads=threads,
        allowed_batch_sizes=tuple(allowed_batch_sizes),
        pad_variable_length_inputs=pad_variable_length_inputs)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        file.write(parameters.to_text())
    os.replace(staging, path)
    return path


# ----------------------------------------------------------------------------- TLS

@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """PEM contents for gRPC over TLS (TF Serving's SSLConfig)."""

    server_key: bytes
    server_cert: bytes
    custom_ca: bytes | None = None  # the clients' CA
    client_verify: bool = False  # clients must present a certificate signed by custom_ca


def read_ssl_config(path: str | os.PathLike) -> TlsConfig:
    """Reads TF Serving's `--ssl_config_file`: an SSLConfig text proto holding PEM contents."""
    path = pathlib.Path(path)
    proto = _SSLConfigProto()
    try:
        text_format.Parse(path.read_text(), proto)
    except (OSError, text_format.ParseError) as error:
        raise ServerConfigError(f"{path}: {error}") from error
    if not proto.server_key or not proto.server_cert:
        raise ServerConfigError(f"{path}: server_key and server_cert (PEM contents) are required")
    return TlsConfig(proto.server_key.encode(), proto.server_cert.encode(),
                     proto.custom_ca.encode() or None, proto.client_verify)


def tls_from_files(cert: str | os.PathLike, key: str | os.PathLike,
                   client_ca: str | os.PathLike | None = None) -> TlsConfig:
    """TLS settings from PEM files (`--tls-cert`, `--tls-key`, `--tls-client-ca`)."""
    try:
        ca = pathlib.Path(client_ca).read_bytes() if client_ca else None
        return TlsConfig(pathlib.Path(key).read_bytes(), pathlib.Path(cert).read_bytes(), ca,
                         client_verify=ca is not None)
    except OSError as error:
        raise ServerConfigError(f"cannot read TLS file: {error}") from error


# ----------------------------------------------------------------------------- command line

def _flag(value: str) -> bool:
    """TF Serving's boolean flags: `--flag`, `--flag=true`, `--flag=false`."""
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`cascade serve`'s flags, spelled as tensorflow_model_server's."""
    boolean = dict(type=_flag, nargs="?", const=True, metavar="BOOL")
    models = parser.add_argument_group("models")
    models.add_argument("--model-base-path", "--model_base_path", dest="model_base_path",
                        help="the folder `cascade export` wrote (with models.config), or one "
                             "model's base path holding integer version directories")
    models.add_argument("--model_config_file",
                        help="a ModelServerConfig text proto (wins over --model-base-path)")
    models.add_argument("--model_name", default=DEFAULT_MODEL_NAME,
                        help="name of a single model at --model-base-path (default: %(default)s)")
    models.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0.0,
                        help="re-read --model_config_file this often; 0: never (default)")
    models.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                        help="look for new versions this often; 0: only at start "
                             "(default: %(default)s)")
    models.add_argument("--enable_model_warmup", default=True, **boolean,
                        help="replay assets.extra/tf_serving_warmup_requests while loading "
                             "(default: true)")
    models.add_argument("--num_request_iterations_for_warmup", type=int, default=1)
    models.add_argument("--allow_version_labels_for_unavailable_models", default=False, **boolean)
    ports = parser.add_argument_group("ports")
    ports.add_argument("--host", default="127.0.0.1",
                       help="interface to listen on (default: %(default)s)")
    ports.add_argument("--port", type=int, default=8500,
                       help="gRPC port; 0 picks a free one (default: %(default)s)")
    ports.add_argument("--rest_api_port", type=int, default=8501,
                       help="REST port; 0 turns REST off (default: %(default)s)")
    ports.add_argument("--rest_api_timeout_in_ms", type=int, default=30_000)
    ports.add_argument("--rest_api_num_threads", type=int)
    ports.add_argument("--grpc_max_threads", type=int)
    ports.add_argument("--enable_grpc_healthcheck_service", default=False, **boolean)
    ports.add_argument("--ssl_config_file",
                       help="an SSLConfig text proto (PEM contents) for gRPC over TLS")
    ports.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate for gRPC over TLS")
    ports.add_argument("--tls-key", dest="tls_key", help="PEM private key for gRPC over TLS")
    ports.add_argument("--tls-client-ca", dest="tls_client_ca",
                       help="PEM CA; clients must then present a certificate it signed")
    batching = parser.add_argument_group("batching")
    batching.add_argument("--enable_batching", default=False, **boolean)
    batching.add_argument("--batching_parameters_file", help="a BatchingParameters text proto")
