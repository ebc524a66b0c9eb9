"""What travels between ranks: payloads, and `CommMessage` parts as bytes, written and read without
copying tensor data more than once.

The bytes are ordinary protobuf encodings of `CommMessage` (comm.proto): any protobuf library reads them.
They are built and read by hand here only because the generated classes copy a `bytes` field on every
step (set, serialize, parse, read: four copies of every tensor on each side), which made large messages
memory-bound. Writing joins the header (encoded by protobuf) and memoryview slices of the data in one
copy; reading returns memoryview slices of the received bytes.

A first part carries the tensor in two occurrences of field 6, which protobuf merges into one message:
the first with shape and dtype (inside the protobuf-encoded header), the second with the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from meshllm.transport import tensors
from meshllm.transport.proto import comm_pb2
from meshllm.transport.proto import meshllm_pb2 as pb

SERVICE = comm_pb2.DESCRIPTOR.services_by_name["Comm"].full_name  # "meshllm.Comm"
RANK_KEY = "x-meshllm-rank"  # gRPC metadata on `Exchange`: the sending rank, known before its first part


@dataclass(frozen=True)
class Payload:
    """A tensor as it travels: raw little-endian bytes, shape and wire dtype name (see tensors.py).

    `data` is any bytes-like object: a view of the sender's array, received data (a read-only view of what
    gRPC delivered), or a writable buffer the parts of a large message were joined in (which the receiver
    then owns).
    """

    data: Any  # bytes | memoryview | numpy uint8 array
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def copy_of(cls, array: Any) -> Payload:
        """A copy of `array`'s data as it goes on the wire (tensors.to_bytes)."""
        data, shape, dtype = tensors.to_bytes(array)
        return cls(data, tuple(shape), dtype)

    @classmethod
    def view_of(cls, array: Any) -> Payload:
        """`array`'s data in its wire layout, without a copy where possible (tensors.to_buffer): whoever
        holds it must not keep it past the call that was given `array`."""
        data, shape, dtype = tensors.to_buffer(array)
        return cls(data, tuple(shape), dtype)

    def snapshot(self) -> Payload:
        """A payload that owns an immutable copy of its data."""
        return self if isinstance(self.data, bytes) else Payload(bytes(self.data), self.shape, self.dtype)


_LENGTH_DELIMITED = 2
_TENSOR_FIELD = 6  # CommMessage.tensor
_DATA_FIELD = 8  # CommMessage.data
_TENSOR_DATA_FIELD = 1  # Tensor.data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_prefix(field: int, length: int) -> bytes:
    """The key and length of a length-delimited field."""
    return _varint(field << 3 | _LENGTH_DELIMITED) + _varint(length)


def encode_first_part(
    source: int,
    channel: int,
    tag: int,
    seq: int,
    collective: str,
    parts: int,
    payload: Payload | None,
    head: int,
) -> bytes:
    """The first part of a message, with the first `head` bytes of the payload's data."""
    # the generated stub types an enum field as its enum class; any int of the enum is accepted
    header = comm_pb2.CommMessage(
        source=source,
        channel=cast(comm_pb2.CommChannel, channel),
        tag=tag,
        seq=seq,
        collective=collective,
        parts=parts,
    )
    if payload is None:
        return header.SerializeToString()
    header.tensor.CopyFrom(pb.Tensor(shape=payload.shape, dtype=payload.dtype))
    data = memoryview(payload.data)[:head]
    inner = _field_prefix(_TENSOR_DATA_FIELD, len(data))
    outer = _field_prefix(_TENSOR_FIELD, len(inner) + len(data))
    return b"".join((header.SerializeToString(), outer, inner, data))


def encode_continuation(data: memoryview) -> bytes:
    """A continuation part: a `CommMessage` with only `data`."""
    return b"".join((_field_prefix(_DATA_FIELD, len(data)), data))


GOODBYE = comm_pb2.CommMessage(goodbye=True).SerializeToString()  # the last part of a stream


@dataclass
class Part:
    """One parsed part. `data` is a slice of the received bytes: the tensor's data in a first part, the
    `data` field in a continuation."""

    source: int = 0
    channel: int = 0
    tag: int = 0
    seq: int = 0
    collective: str = ""
    parts: int = 0
    has_tensor: bool = False
    shape: tuple[int, ...] = ()
    dtype: str = ""
    data: memoryview | None = None
    goodbye: bool = False


def _read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
        if shift >= 70:
            raise ValueError("malformed varint")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buffer: memoryview):  # type: ignore[no-untyped-def]
    """(field number, int value or memoryview) for every field of an encoded message, in order."""
    position, end = 0, len(buffer)
    while position < end:
        key, position = _read_varint(buffer, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _read_varint(buffer, position)
            yield field, value
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _read_varint(buffer, position)
            if position + length > end:
                raise ValueError("truncated field")
            yield field, buffer[position : position + length]
            position += length
        elif wire_type == 1:
            position += 8  # fixed64: no such field in CommMessage; skipped like any unknown field
        elif wire_type == 5:
            position += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    if position != end:
        raise ValueError("truncated message")


def parse_part(raw: bytes | memoryview) -> Part:
    """Read one encoded `CommMessage`, as protobuf would (later fields win, field 6 merges)."""
    part = Part()
    shape: list[int] = []
    for field, value in _fields(memoryview(raw)):
        if field == 1:
            part.source = _signed64(value)
        elif field == 2:
            part.channel = value
        elif field == 3:
            part.tag = _signed64(value)
        elif field == 4:
            part.seq = value
        elif field == 5:
            part.collective = bytes(value).decode()
        elif field == _TENSOR_FIELD:
            part.has_tensor = True
            for tensor_field, tensor_value in _fields(value):
                if tensor_field == _TENSOR_DATA_FIELD:
                    part.data = tensor_value
                elif tensor_field == 2 and isinstance(tensor_value, memoryview):  # packed shape
                    position = 0
                    while position < len(tensor_value):
                        dim, position = _read_varint(tensor_value, position)
                        shape.append(_signed64(dim))
                elif tensor_field == 2:
                    shape.append(_signed64(tensor_value))
                elif tensor_field == 3:
                    part.dtype = bytes(tensor_value).decode()
        elif field == 7:
            part.parts = value
        elif field == _DATA_FIELD:
            part.data = value
        elif field == 9:
            part.goodbye = bool(value)
    part.shape = tuple(shape)
    if part.has_tensor and part.data is None:
        part.data = memoryview(b"")
    return part
