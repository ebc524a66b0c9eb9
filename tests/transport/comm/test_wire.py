"""wire.py: the parts of a message, written by hand, are what protobuf writes and reads; payloads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from meshllm.transport.comm.wire import GOODBYE, Payload, encode_continuation, encode_first_part, parse_part
from meshllm.transport.proto import comm_pb2


def test_a_first_part_reads_as_the_comm_message_it_encodes() -> None:
    payload = Payload(bytes(range(200)), (10, 5), "float32")
    raw = encode_first_part(3, 1, -7, 42, "all_reduce", 2, payload, head=120)
    message = comm_pb2.CommMessage.FromString(raw)
    assert (message.source, message.channel, message.tag, message.seq) == (3, 1, -7, 42)
    assert (message.collective, message.parts) == ("all_reduce", 2)
    assert list(message.tensor.shape) == [10, 5] and message.tensor.dtype == "float32"
    assert message.tensor.data == bytes(range(120))


def test_parts_written_by_protobuf_are_read_back_field_for_field() -> None:
    message = comm_pb2.CommMessage(
        source=5, channel=1, tag=-(2**40), seq=2**35, collective="barrier", parts=3
    )
    message.tensor.data = b"\x01\x02\x03\x04"
    message.tensor.shape.extend([1, 0, 2**33])
    message.tensor.dtype = "bfloat16"
    part = parse_part(message.SerializeToString())
    assert (part.source, part.channel, part.tag, part.seq) == (5, 1, -(2**40), 2**35)
    assert (part.collective, part.parts, part.has_tensor) == ("barrier", 3, True)
    assert part.shape == (1, 0, 2**33) and part.dtype == "bfloat16"
    assert bytes(part.data) == b"\x01\x02\x03\x04"


def test_a_message_without_data_has_no_tensor_and_an_empty_tensor_has_empty_data() -> None:
    assert not parse_part(encode_first_part(0, 1, 0, 0, "barrier", 1, None, 0)).has_tensor
    empty = parse_part(encode_first_part(0, 0, 0, 0, "", 1, Payload(b"", (0,), "int64"), 0))
    assert empty.has_tensor and empty.shape == (0,) and bytes(empty.data) == b""


def test_continuations_and_goodbye_are_comm_messages_too() -> None:
    raw = encode_continuation(memoryview(b"abc" * 1000))
    assert comm_pb2.CommMessage.FromString(raw).data == b"abc" * 1000
    assert bytes(parse_part(raw).data) == b"abc" * 1000
    assert comm_pb2.CommMessage.FromString(GOODBYE).goodbye and parse_part(GOODBYE).goodbye


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(12, dtype=np.int64).reshape(4, 3)[::2],  # not contiguous
        torch.linspace(-3, 3, 7, dtype=torch.bfloat16),
        torch.arange(6, dtype=torch.int32).reshape(2, 3).t(),
    ],
    ids=["numpy", "numpy-strided", "torch-bfloat16", "torch-transposed"],
)
def test_a_view_payload_holds_the_bytes_of_a_copy(array: Any) -> None:
    view, copy = Payload.view_of(array), Payload.copy_of(array)
    assert bytes(view.data) == copy.data and view.shape == copy.shape and view.dtype == copy.dtype


def test_a_snapshot_owns_a_copy_and_a_bytes_payload_is_its_own_snapshot() -> None:
    values = np.arange(4, dtype=np.int32)
    view = Payload.view_of(values)
    snapshot = view.snapshot()
    values[:] = 9
    assert isinstance(snapshot.data, bytes) and snapshot.data == np.arange(4, dtype=np.int32).tobytes()
    assert snapshot.snapshot() is snapshot
