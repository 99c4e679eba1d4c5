"""The standard gRPC health service (`grpc.health.v1.Health`: Check and Watch), which TF Serving
serves behind `--enable_grpc_healthcheck_service` for "", "ModelService" and "PredictionService".

grpcio-health-checking is not a dependency, so health.proto's two messages are declared here, in
a private descriptor pool that cannot clash with that package's if it is ever installed.
"""

from __future__ import annotations

import threading

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "grpc.health.v1.Health"
UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN = range(4)  # HealthCheckResponse.ServingStatus


def _messages() -> tuple[type, type]:
    field = descriptor_pb2.FieldDescriptorProto
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="cascade/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3")
    request = file_proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING,
                      label=field.LABEL_OPTIONAL, json_name="service")
    response = file_proto.message_type.add(name="HealthCheckResponse")
    statuses = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]):
        statuses.value.add(name=name, number=number)
    response.field.add(name="status", number=1, type=field.TYPE_ENUM, label=field.LABEL_OPTIONAL,
                       type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
                       json_name="status")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.health.v1.{n}"))
                 for n in ("HealthCheckRequest", "HealthCheckResponse"))


HealthCheckRequest, HealthCheckResponse = _messages()


class HealthService:
    """NOT_SERVING until the server is up, SERVING while it serves, NOT_SERVING once it stops."""

    SERVICES = ("", "ModelService", "PredictionService")

    def __init__(self):
        self._status = NOT_SERVING
        self._changed = threading.Condition()

    def set_serving(self, serving: bool) -> None:
        with self._changed:
            self._status = SERVING if serving else NOT_SERVING
            self._changed.notify_all()

    def check(self, request, context):
        if request.service not in self.SERVICES:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return HealthCheckResponse(status=self._status)

    def watch(self, request, context):
        """Streams the status now and at every change, until the client goes away."""
        known, last = request.service in self.SERVICES, None
        while context.is_active():
            with self._changed:
                status = self._status if known else SERVICE_UNKNOWN
                if status == last:
                    self._changed.wait(1.0)
                    continue
            last = status
            yield HealthCheckResponse(status=status)

    def handler(self) -> grpc.GenericRpcHandler:
        options = dict(request_deserializer=HealthCheckRequest.FromString,
                       response_serializer=HealthCheckResponse.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Check": grpc.unary_unary_rpc_method_handler(self.check, **options),
            "Watch": grpc.unary_stream_rpc_method_handler(self.watch, **options),
        })
