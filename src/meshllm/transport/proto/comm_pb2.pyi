from meshllm.transport.proto import meshllm_pb2 as _meshllm_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CommChannel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMM_CHANNEL_POINT_TO_POINT: _ClassVar[CommChannel]
    COMM_CHANNEL_COLLECTIVE: _ClassVar[CommChannel]
COMM_CHANNEL_POINT_TO_POINT: CommChannel
COMM_CHANNEL_COLLECTIVE: CommChannel

class CommHelloRequest(_message.Message):
    __slots__ = ("rank", "world_size")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ...) -> None: ...

class CommHelloReply(_message.Message):
    __slots__ = ("rank", "world_size", "link_port", "link_socket")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LINK_PORT_FIELD_NUMBER: _ClassVar[int]
    LINK_SOCKET_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    link_port: int
    link_socket: str
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ..., link_port: _Optional[int] = ..., link_socket: _Optional[str] = ...) -> None: ...

class CommMessage(_message.Message):
    __slots__ = ("source", "channel", "tag", "seq", "collective", "tensor", "parts", "data", "goodbye")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    source: int
    channel: CommChannel
    tag: int
    seq: int
    collective: str
    tensor: _meshllm_pb2.Tensor
    parts: int
    data: bytes
    goodbye: bool
    def __init__(self, source: _Optional[int] = ..., channel: _Optional[_Union[CommChannel, str]] = ..., tag: _Optional[int] = ..., seq: _Optional[int] = ..., collective: _Optional[str] = ..., tensor: _Optional[_Union[_meshllm_pb2.Tensor, _Mapping]] = ..., parts: _Optional[int] = ..., data: _Optional[bytes] = ..., goodbye: _Optional[bool] = ...) -> None: ...

class CommStreamSummary(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: int
    def __init__(self, messages: _Optional[int] = ...) -> None: ...
