"""TF Serving's JSON tensor formats (tensorflow_serving/util/json_tensor.cc) for the REST API.

Requests: row format (`"instances": [...]`, one element per batch row, objects keyed by input
alias when there are several inputs) or columnar (`"inputs": ...`, each input whole). Answers:
`{"predictions": [...]}` for row requests, `{"outputs": ...}` for columnar ones; with a single
output its name is dropped. Binary strings travel as `{"b64": "..."}`; string outputs whose alias
ends in `_bytes` are always sent that way. Error messages are TF Serving's.
"""

from __future__ import annotations

import base64
import binascii
import json
import math

import numpy as np
import tensorflow as tf
from grpc import StatusCode

from serving.model_server.status import ServingError

_DEBUG_LIMIT = 256  # TF Serving's kMaxJsonDebugStringBytes
_INT_RANGES = {tf.int8: (-2**7, 2**7), tf.uint8: (0, 2**8), tf.int16: (-2**15, 2**15),
               tf.int32: (-2**31, 2**31), tf.uint32: (0, 2**32), tf.int64: (-2**63, 2**63),
               tf.uint64: (0, 2**64)}


def _invalid(message: str) -> ServingError:
    return ServingError(StatusCode.INVALID_ARGUMENT, message)


def debug_string(value) -> str:
    """A JSON value for an error message, cut at 256 bytes as TF Serving cuts it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)[:_DEBUG_LIMIT]


def _json_type(value) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    return {dict: "Object", list: "Array", str: "String"}.get(type(value), "Number")


def _type_name(dtype: tf.DType) -> str:
    return {tf.float32: "float", tf.float64: "double"}.get(dtype, dtype.name)  # DataTypeString


def is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def is_object(value) -> bool:
    """A JSON object that is not a `{"b64": ...}` string."""
    return isinstance(value, dict) and not is_b64(value)


# ----------------------------------------------------------------------------- JSON -> arrays

def _scalar(value, dtype: tf.DType):
    """One JSON leaf as a value of `dtype` (TF Serving's AddValueToTensor)."""
    if dtype == tf.string:
        if isinstance(value, dict):
            if not is_b64(value):
                raise _invalid(f"JSON Value: {debug_string(value)} not formatted correctly for "
                               "base64 data")
            text = value["b64"]
            try:
                return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
            except (binascii.Error, ValueError) as error:
                raise _invalid("Unable to base64 decode") from error
        if isinstance(value, str):
            return value.encode()
    elif dtype == tf.bool:
        if isinstance(value, bool):
            return value
    elif dtype in (tf.float32, tf.float64):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]
        if isinstance(value, int) and not isinstance(value, bool) and low <= value < high:
            return value
    else:
        raise ServingError(StatusCode.UNIMPLEMENTED, f"Conversion of JSON Value: "
                           f"{debug_string(value)} to type: {_type_name(dtype)}")
    raise _invalid(f"JSON Value: {debug_string(value)} Type: {_json_type(value)} is not of "
                   f"expected type: {_type_name(dtype)}")


def _dense_shape(value) -> list[int]:
    """The shape read down the first elements (TF Serving's GetDenseTensorShape)."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value, level: int, shape: list[int], dtype: tf.DType, out: list) -> None:
    """Flattens nested lists that must be dense to `shape` (TF Serving's FillTensorProto)."""
    if not isinstance(value, list):
        if level != len(shape):
            raise _invalid(f"JSON Value: {debug_string(value)} found at incorrect level: "
                           f"{level + 1} in the JSON DOM. Expected at level: {len(shape)}")
        out.append(_scalar(value, dtype))
        return
    if level >= len(shape):
        raise _invalid(f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(value) != shape[level]:
        raise _invalid(f"Encountered list at unexpected size: {len(value)} at level: {level} "
                       f"expected size: {shape[level]}")
    for item in value:
        _fill(item, level + 1, shape, dtype, out)


def _flatten(value, dtype: tf.DType) -> tuple[list, list[int]]:
    shape, flat = _dense_shape(value), []
    _fill(value, 0, shape, dtype, flat)
    return flat, shape


def _array(flat: list, shape: list[int], dtype: tf.DType) -> np.ndarray:
    if dtype == tf.string:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
    else:
        array = np.array(flat, dtype=dtype.as_numpy_dtype)
    return array.reshape(shape)


def _shape_text(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def instances_to_arrays(instances: list, infos) -> dict[str, np.ndarray]:
    """Row format: each instance is one row of every input (FillTensorMapFromInstancesList).
    `infos` is the signature's inputs map (alias -> TensorInfo)."""
    if not is_object(instances[0]) and len(infos) > 1:
        raise _invalid("instances is a plain list, but expecting list of objects as multiple "
                       "input tensors required as per tensorinfo_map")
    objects = is_object(instances[0])
    names = sorted(infos)
    rows: dict[str, list] = {}
    shapes: dict[str, list[int]] = {}

    def add(item, name):
        if name not in infos:
            raise _invalid(f"JSON object: does not have named input: {name}")
        flat, shape = _flatten(item, tf.as_dtype(infos[name].dtype))
        if name not in shapes:
            shapes[name] = shape
        elif int(np.prod(shapes[name])) != len(flat):
            raise _invalid(f"Expecting tensor size: {int(np.prod(shapes[name]))} but got: "
                           f"{len(flat)}")
        elif shapes[name] != shape:
            raise _invalid(f"Expecting shape {_shape_text(shapes[name])} but got: "
                           f"{_shape_text(shape)}")
        rows.setdefault(name, []).extend(flat)

    for index, element in enumerate(instances):
        if objects:
            if not is_object(element):
                raise _invalid(f"Expecting object but got list at item {index} of input list")
            for key, item in element.items():
                try:
                    add(item, key)
                except ServingError as error:
                    raise _invalid(f"Failed to process element: {index} key: {key} of "
                                   f"'instances' list. Error: {error}") from error
            if set(element) != set(names):
                raise _invalid(f"Failed to process element: {index} of 'instances' list. JSON "
                               f"object: {debug_string(element)} keys must be equal to: "
                               f"{','.join(names)}")
        else:
            if is_object(element):
                raise _invalid(f"Expecting value/list but got object at item {index} of input list")
            try:
                add(element, names[0])
            except ServingError as error:
                raise _invalid(f"Failed to process element: {index} of 'instances' list. Error: "
                               f"{error}") from error
    return {name: _array(rows[name], [len(instances)] + shapes[name],
                         tf.as_dtype(infos[name].dtype)) for name in rows}


def inputs_to_arrays(inputs, infos) -> dict[str, np.ndarray]:
    """Columnar format: each input whole, batch dimension included (FillTensorMapFromInputsMap).
    Keys that are not inputs are ignored, as TF Serving ignores them."""
    if not isinstance(inputs, dict) or is_b64(inputs):
        if len(infos) > 1:
            raise _invalid("inputs is a plain value/list, but expecting an object as multiple "
                           "input tensors required as per tensorinfo_map")
        named = {next(iter(infos)): inputs}
    else:
        named = {}
        for name in sorted(infos):
            if name not in inputs:
                raise _invalid(f"Missing named input: {name} in 'inputs' object.")
            named[name] = inputs[name]
    arrays = {}
    for name, value in named.items():
        dtype = tf.as_dtype(infos[name].dtype)
        arrays[name] = _array(*_flatten(value, dtype), dtype)
    return arrays


# ----------------------------------------------------------------------------- arrays -> JSON

def _decimal(value: float, single: bool) -> str:
    """TF Serving's WriteDecimal: %g if it round-trips, else full precision; whole numbers get
    a trailing .0 so that every value of a float tensor reads as a float."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    text = "%g" % value
    same = np.float32(text) == np.float32(value) if single else float(text) == value
    if not same:
        text = ("%.9g" if single else "%.17g") % value
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def _tokens(name: str, array: np.ndarray) -> list[str]:
    """Every value of `array`, flattened, as JSON text."""
    flat = array.ravel().tolist()
    kind = array.dtype.kind
    if kind == "f":
        return [_decimal(v, array.dtype.itemsize <= 4) for v in flat]
    if kind == "b":
        return ["true" if v else "false" for v in flat]
    if kind in "iu":
        return [str(v) for v in flat]
    tokens = []
    for value in flat:
        value = value if isinstance(value, bytes) else str(value).encode()
        text = None
        if not name.endswith("_bytes"):
            try:
                text = json.dumps(value.decode("utf-8"), ensure_ascii=False)
            except UnicodeDecodeError:
                pass  # not text: sent as base64 rather than as invalid JSON
        tokens.append(text or '{"b64": "' + base64.b64encode(value).decode() + '"}')
    return tokens


def _nest(tokens: list[str], shape: tuple[int, ...]) -> str:
    if not shape:
        return tokens[0]
    step = int(np.prod(shape[1:], dtype=np.int64))
    parts = (_nest(tokens[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0]))
    return "[" + ", ".join(parts) + "]"


def _value(name: str, array: np.ndarray) -> str:
    return _nest(_tokens(name, array), array.shape)


def _rows(name: str, array: np.ndarray) -> list[str]:
    tokens, shape = _tokens(name, array), array.shape
    step = int(np.prod(shape[1:], dtype=np.int64))
    return [_nest(tokens[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def arrays_to_json(outputs: dict[str, np.ndarray], row_format: bool) -> str:
    """The answer to a row (`predictions`) or columnar (`outputs`) request."""
    if not outputs:
        raise _invalid("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if not row_format:
        if len(names) == 1:
            return '{"outputs": ' + _value(names[0], outputs[names[0]]) + "}"
        fields = (f"{json.dumps(n)}: {_value(n, outputs[n])}" for n in names)
        return '{"outputs": {' + ", ".join(fields) + "}}"
    batch = None
    for name in names:
        if outputs[name].ndim == 0:
            raise _invalid(f"Tensor name: {name} has no shape information ")
        if batch is not None and outputs[name].shape[0] != batch:
            raise _invalid(f"Tensor name: {name} has inconsistent batch size: "
                           f"{outputs[name].shape[0]} expecting: {batch}")
        batch = outputs[name].shape[0]
    rows = {name: _rows(name, outputs[name]) for name in names}
    if len(names) == 1:
        items = rows[names[0]]
    else:
        items = ["{" + ", ".join(f"{json.dumps(n)}: {rows[n][i]}" for n in names) + "}"
                 for i in range(batch)]
    return '{"predictions": [' + ", ".join(items) + "]}"
