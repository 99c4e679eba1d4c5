"""Errors of `cascade serve` as TF Serving reports them: a gRPC status code, a message cut at 1024
characters, and the HTTP status its REST API maps each code to (TFSERVING.md's table)."""

from __future__ import annotations

import http

import grpc

MESSAGE_LIMIT = 1024  # TF Serving's ToGRPCStatus kErrorMessageLimit

_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
# tensorflow_serving/model_servers/http_server.cc ToHTTPStatusCode
_HTTP = {
    grpc.StatusCode.OK: http.HTTPStatus.OK,
    grpc.StatusCode.CANCELLED: 499,  # CLIENT_CLOSED_REQUEST
    grpc.StatusCode.UNKNOWN: http.HTTPStatus.INTERNAL_SERVER_ERROR,
    grpc.StatusCode.INVALID_ARGUMENT: http.HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.DEADLINE_EXCEEDED: http.HTTPStatus.GATEWAY_TIMEOUT,
    grpc.StatusCode.NOT_FOUND: http.HTTPStatus.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: http.HTTPStatus.CONFLICT,
    grpc.StatusCode.PERMISSION_DENIED: http.HTTPStatus.FORBIDDEN,
    grpc.StatusCode.RESOURCE_EXHAUSTED: http.HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.FAILED_PRECONDITION: http.HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.ABORTED: http.HTTPStatus.CONFLICT,
    grpc.StatusCode.OUT_OF_RANGE: http.HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.UNIMPLEMENTED: http.HTTPStatus.NOT_IMPLEMENTED,
    grpc.StatusCode.INTERNAL: http.HTTPStatus.INTERNAL_SERVER_ERROR,
    grpc.StatusCode.UNAVAILABLE: http.HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS: http.HTTPStatus.INTERNAL_SERVER_ERROR,
    grpc.StatusCode.UNAUTHENTICATED: http.HTTPStatus.UNAUTHORIZED,
}


class ServingError(Exception):
    """A request or a load failed with a status code; `message` is what the client reads."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @property
    def http_status(self) -> int:
        return int(_HTTP.get(self.code, http.HTTPStatus.INTERNAL_SERVER_ERROR))

    @classmethod
    def from_exception(cls, error: BaseException) -> "ServingError":
        """Keeps a ServingError, maps a TensorFlow OpError by its code (TF codes are gRPC's), and
        reports anything else as INTERNAL."""
        if isinstance(error, ServingError):
            return error
        code = getattr(error, "error_code", None)  # tf.errors.OpError
        if isinstance(code, int) and code in _BY_VALUE and code != 0:
            return cls(_BY_VALUE[code], getattr(error, "message", str(error)))
        return cls(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


def truncate(message: str) -> str:
    """TF Serving cuts messages over 1024 characters and says so."""
    return message if len(message) <= MESSAGE_LIMIT else message[:MESSAGE_LIMIT] + "...TRUNCATED"


def code_from_value(value: int) -> grpc.StatusCode:
    """The gRPC code with this number (tensorflow.error.Code uses the same numbers)."""
    return _BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)
