"""One loaded SavedModel version, and Predict on it as TF Serving's RunPredict does: signature
lookup, input and output alias checks, tensor parsing; then, beyond TF Serving, dtype and shape
checks against the SignatureDef, so that a bad request is INVALID_ARGUMENT before the graph runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import threading
import time
from typing import Mapping

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  its ops are linked into stock TF Serving: exports use them
from google.protobuf import message as protobuf_message
from google.protobuf import text_format
from grpc import StatusCode
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import model_pb2

from serving.model_server.batching import Batcher
from serving.model_server.status import ServingError

Tensors = dict[str, np.ndarray]
SignatureDef = meta_graph_pb2.SignatureDef
SERVING_DEFAULT = "serving_default"
SERVE_TAG = "serve"
EXPORT_RECORD = pathlib.Path("assets.extra", "cascade_export.json")  # serving/export.py writes it
MAX_TENSOR_ELEMENTS = 1 << 28  # a TensorProto can claim a huge shape and fill it from one value


def _invalid(message: str) -> ServingError:
    return ServingError(StatusCode.INVALID_ARGUMENT, message)


def _joined(names) -> str:
    return "{" + ",".join(sorted(names)) + "}"


def _shape_text(dims) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


# ----------------------------------------------------------------------------- a loaded version

class Servable:
    """A loaded version: its signatures (as its MetaGraphDef has them) and their functions."""

    def __init__(self, name: str, version: int, path: pathlib.Path,
                 meta_graph: meta_graph_pb2.MetaGraphDef, module):
        self.name, self.version, self.path = name, version, path
        self.signature_defs = dict(meta_graph.signature_def)
        self._module = module
        self._in_flight = 0
        self._idle = threading.Condition()

    def __repr__(self) -> str:
        return f"{{name: {self.name} version: {self.version}}}"

    def run(self, signature_name: str, inputs: Tensors) -> Tensors:
        """Runs a signature's function; inputs and outputs are numpy arrays keyed by alias."""
        functions = self._module.signatures
        if signature_name not in functions:  # e.g. __saved_model_init_op, which is no function
            raise ServingError(StatusCode.FAILED_PRECONDITION,
                               f'Serving signature key "{signature_name}" has no function to run.')
        signature = self.signature_defs[signature_name]
        tensors = {alias: tf.convert_to_tensor(array, tf.as_dtype(signature.inputs[alias].dtype))
                   for alias, array in inputs.items()}
        outputs = functions[signature_name](**tensors)
        return {alias: np.asarray(tensor.numpy()) for alias, tensor in outputs.items()}

    def enter(self) -> None:
        with self._idle:
            self._in_flight += 1

    def leave(self) -> None:
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()

    def wait_idle(self, abandon: threading.Event) -> None:
        """Waits until no request holds this version (or until `abandon` is set)."""
        with self._idle:
            while self._in_flight and not abandon.is_set():
                self._idle.wait(0.5)

    def release(self) -> None:
        self._module = None


def read_meta_graph(path: pathlib.Path) -> meta_graph_pb2.MetaGraphDef:
    """The `serve` MetaGraphDef of a SavedModel directory; TF's errors for missing or bad files."""
    saved_model = saved_model_pb2.SavedModel()
    binary, text = path / "saved_model.pb", path / "saved_model.pbtxt"
    try:
        if binary.exists():
            saved_model.ParseFromString(binary.read_bytes())
        elif text.exists():
            text_format.Parse(text.read_text(), saved_model)
        else:
            raise ServingError(StatusCode.NOT_FOUND, "Could not find SavedModel .pb or .pbtxt at "
                               f"supplied export directory path: {path}")
    except (protobuf_message.DecodeError, text_format.ParseError, UnicodeDecodeError) as error:
        raise ServingError(StatusCode.DATA_LOSS,
                           f"Can't parse {binary} as binary proto: {error}") from error
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    raise ServingError(StatusCode.NOT_FOUND, "Could not find meta graph def matching supplied "
                       "tags: { serve }. To inspect available tag-sets in the SavedModel, please "
                       "use the SavedModel CLI: `saved_model_cli`")


def _import_scann() -> None:
    try:
        import scann  # noqa: F401  registers the Scann* ops that a ScaNN export's graph uses
    except ImportError as error:
        raise ServingError(StatusCode.FAILED_PRECONDITION, "this version uses ScaNN ops but "
                           f"scann cannot be imported: {error}") from error


def load_servable(name: str, version: int, path: pathlib.Path) -> Servable:
    """Loads a version directory. ScaNN's ops are registered first when the export record says
    so, or when loading fails for want of them (stock TF has no Scann* ops)."""
    meta_graph = read_meta_graph(path)
    record = path / EXPORT_RECORD
    if record.exists():
        with contextlib.suppress(ValueError, OSError):
            if json.loads(record.read_text()).get("index") == "scann":
                _import_scann()
    try:
        module = tf.saved_model.load(str(path), tags=[SERVE_TAG])
    except Exception as error:  # TF raises many types; the message says what was wrong
        if "Op type not registered 'Scann" not in str(error):
            raise ServingError.from_exception(error) from error
        _import_scann()
        module = tf.saved_model.load(str(path), tags=[SERVE_TAG])
    return Servable(name, version, path, meta_graph, module)


# ----------------------------------------------------------------------------- request checks

def tensor_to_array(alias: str, tensor) -> np.ndarray:
    """A request's TensorProto as an array (strings as bytes objects); INVALID_ARGUMENT if bad."""
    if isinstance(tensor, np.ndarray):
        return tensor
    dims = [d.size for d in tensor.tensor_shape.dim]
    if any(d < 0 for d in dims) or tensor.tensor_shape.unknown_rank:
        raise _invalid(f"tensor parsing error: {alias}")
    if np.prod(dims, dtype=np.float64) > MAX_TENSOR_ELEMENTS:
        raise _invalid(f"tensor parsing error: {alias} has shape {_shape_text(dims)}, more than "
                       f"{MAX_TENSOR_ELEMENTS} elements")
    try:
        return np.asarray(tf.make_ndarray(tensor))
    except Exception as error:  # make_ndarray raises TypeError, ValueError... on a bad proto
        raise _invalid(f"tensor parsing error: {alias}") from error


def _dtype_of(array: np.ndarray) -> tf.DType | None:
    if array.dtype.kind in "OSU":
        return tf.string
    try:
        return tf.as_dtype(array.dtype)
    except TypeError:
        return None


def _check_input_names(signature: SignatureDef, inputs: Mapping) -> None:
    sent, expected = set(inputs), set(signature.inputs)
    extra, missing = sent - expected, expected - sent - set(signature.defaults)
    if len(sent) > len(expected) or (len(sent) < len(expected) and not signature.defaults):
        raise _invalid(f"input size does not match signature: {len(sent)}!={len(expected)} "
                       f"len({_joined(sent)}) != len({_joined(expected)}). Sent extra: "
                       f"{_joined(extra)}. Missing but required: {_joined(expected - sent)}.")
    if extra or missing:
        raise _invalid(f"input names do not match signature: Sent extra: {_joined(extra)}. "
                       f"Missing but required: {_joined(missing)}. Expected inputs: "
                       f"{_joined(expected)}.")


def _check_input_tensors(signature: SignatureDef, arrays: Tensors) -> None:
    """Dtypes and shapes against the signature (TF Serving leaves shapes to the graph)."""
    for index, alias in enumerate(sorted(signature.inputs)):
        info, array = signature.inputs[alias], arrays[alias]
        expected, sent = tf.as_dtype(info.dtype), _dtype_of(array)
        if sent != expected:
            raise _invalid(f"Expects arg[{index}] ({alias}) to be {expected.name} but "
                           f"{sent.name if sent else array.dtype} is provided")
        if info.tensor_shape.unknown_rank:
            continue
        dims = [d.size for d in info.tensor_shape.dim]
        if len(dims) != array.ndim or any(e >= 0 and e != s for e, s in zip(dims, array.shape)):
            raise _invalid(f"input {alias} has shape {_shape_text(array.shape)} but the signature "
                           f"expects shape {_shape_text(dims)} (-1 is any size)")


def _output_aliases(signature: SignatureDef, output_filter) -> list[str]:
    if not output_filter:
        return sorted(signature.outputs)
    seen = []
    for alias in output_filter:
        if alias not in signature.outputs:
            raise _invalid(f"output tensor alias not found in signature: {alias} Outputs expected "
                           f"to be in the set {_joined(signature.outputs)}.")
        if alias in seen:
            raise _invalid(f"duplicate output tensor alias: {alias}")
        seen.append(alias)
    return seen


def predict(servable: Servable, model_spec: model_pb2.ModelSpec, inputs: Mapping,
            output_filter=(), deadline: float | None = None,
            batcher: Batcher | None = None) -> tuple[model_pb2.ModelSpec, Tensors]:
    """Predict on a held servable. `inputs` maps aliases to TensorProtos or arrays (strings as
    bytes); returns the response's ModelSpec (name, resolved signature, version) and outputs."""
    signature_name = model_spec.signature_name or SERVING_DEFAULT
    signature = servable.signature_defs.get(signature_name)
    if signature is None:
        raise ServingError(StatusCode.FAILED_PRECONDITION,
                           f'Serving signature key "{signature_name}" not found.')
    response_spec = model_pb2.ModelSpec(name=model_spec.name, signature_name=signature_name)
    response_spec.version.value = servable.version
    _check_input_names(signature, inputs)
    arrays = {alias: tensor_to_array(alias, tensor) for alias, tensor in inputs.items()}
    for alias in set(signature.inputs) - set(arrays):
        arrays[alias] = tensor_to_array(alias, signature.defaults[alias])
    aliases = _output_aliases(signature, output_filter)
    _check_input_tensors(signature, arrays)
    if deadline is not None and deadline <= time.monotonic():
        raise ServingError(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    run = functools.partial(servable.run, signature_name)
    try:
        if batcher is not None:
            key = (servable, signature_name, tuple(sorted(arrays)), tuple(aliases))
            outputs = batcher.run(key, run, arrays, deadline)
        else:
            outputs = run(arrays)
    except Exception as error:  # TF's OpErrors keep their own status code
        raise ServingError.from_exception(error) from error
    return response_spec, {alias: outputs[alias] for alias in aliases}


# ----------------------------------------------------------------------------- outputs

_VALUE_FIELDS = {
    tf.float32: "float_val", tf.float64: "double_val", tf.int64: "int64_val", tf.bool: "bool_val",
    tf.string: "string_val", tf.uint32: "uint32_val", tf.uint64: "uint64_val",
    tf.int32: "int_val", tf.int16: "int_val", tf.int8: "int_val", tf.uint8: "int_val",
    tf.uint16: "int_val", tf.float16: "half_val", tf.bfloat16: "half_val",
}


def tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """An output as TF Serving sends it: typed value fields (`float_val`...), not tensor_content
    (Tensor::AsProtoField), so clients that read `outputs["scores"].float_val` work."""
    array = np.asarray(array)
    dtype = _dtype_of(array)
    field = _VALUE_FIELDS.get(dtype)
    if field is None:
        return tf.make_tensor_proto(array)
    proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    flat = array.ravel()
    if dtype == tf.string:
        values = [v if isinstance(v, bytes) else str(v).encode() for v in flat]
    elif dtype in (tf.float16, tf.bfloat16):
        values = flat.view(np.uint16).tolist()
    else:
        values = flat.tolist()
    getattr(proto, field).extend(values)
    return proto
