"""The ``google.rpc`` messages the gateway sends, without googleapis protos: one private pool.

``Status`` (the ``grpc-status-details-bin`` trailer) and the details it carries -
``RetryInfo`` (:mod:`.retry_info`), ``ErrorInfo`` and ``BadRequest`` (:mod:`.error_details`)
- are declared here in one descriptor pool of their own, wire-identical to the googleapis
definitions (same package, names and field numbers, so any client decodes them and the
``Any`` type URLs are the standard ``type.googleapis.com/google.rpc.*``). A private pool
means no clash when googleapis' own ``google.rpc`` modules are imported in the same process,
and the gateway image needs no googleapis package. One pool, so that each message is
declared once and both modules pack and parse the same classes.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    message_factory,
)

DETAILS_KEY = "grpc-status-details-bin"

_FIELD = descriptor_pb2.FieldDescriptorProto
_STRING, _MESSAGE = _FIELD.TYPE_STRING, _FIELD.TYPE_MESSAGE
_OPTIONAL, _REPEATED = _FIELD.LABEL_OPTIONAL, _FIELD.LABEL_REPEATED


def _file() -> descriptor_pb2.FileDescriptorProto:
    """google/rpc/status.proto and the error details used, as one file of our own name."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="recsys/google_rpc.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto", "google/protobuf/duration.proto"],
    )
    status = proto.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=_FIELD.TYPE_INT32, label=_OPTIONAL)
    status.field.add(name="message", number=2, type=_STRING, label=_OPTIONAL)
    status.field.add(
        name="details", number=3, type=_MESSAGE, label=_REPEATED, type_name=".google.protobuf.Any"
    )
    retry = proto.message_type.add(name="RetryInfo")
    retry.field.add(
        name="retry_delay",
        number=1,
        type=_MESSAGE,
        label=_OPTIONAL,
        type_name=".google.protobuf.Duration",
    )
    info = proto.message_type.add(name="ErrorInfo")
    info.field.add(name="reason", number=1, type=_STRING, label=_OPTIONAL)
    info.field.add(name="domain", number=2, type=_STRING, label=_OPTIONAL)
    entry = info.nested_type.add(name="MetadataEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=_STRING, label=_OPTIONAL)
    entry.field.add(name="value", number=2, type=_STRING, label=_OPTIONAL)
    info.field.add(
        name="metadata",
        number=3,
        type=_MESSAGE,
        label=_REPEATED,
        type_name=".google.rpc.ErrorInfo.MetadataEntry",
    )
    bad = proto.message_type.add(name="BadRequest")
    violation = bad.nested_type.add(name="FieldViolation")
    violation.field.add(name="field", number=1, type=_STRING, label=_OPTIONAL)
    violation.field.add(name="description", number=2, type=_STRING, label=_OPTIONAL)
    bad.field.add(
        name="field_violations",
        number=1,
        type=_MESSAGE,
        label=_REPEATED,
        type_name=".google.rpc.BadRequest.FieldViolation",
    )
    return proto


POOL = descriptor_pool.DescriptorPool()
for _module in (any_pb2, duration_pb2):
    POOL.AddSerializedFile(_module.DESCRIPTOR.serialized_pb)
POOL.AddSerializedFile(_file().SerializeToString())


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"google.rpc.{name}"))


Status = _message("Status")
RetryInfo = _message("RetryInfo")
ErrorInfo = _message("ErrorInfo")
BadRequest = _message("BadRequest")
