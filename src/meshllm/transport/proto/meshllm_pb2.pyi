from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "min_tokens", "eos_token_ids")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    min_tokens: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., min_tokens: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("seq_id", "start_pos", "n_tokens", "sample", "sampling", "sampled")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    N_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    start_pos: int
    n_tokens: int
    sample: bool
    sampling: Sampling
    sampled: int
    def __init__(self, seq_id: _Optional[int] = ..., start_pos: _Optional[int] = ..., n_tokens: _Optional[int] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., sampled: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step_id", "segments", "token_ids", "hidden_states", "alone", "timings")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ALONE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    token_ids: Tensor
    hidden_states: Tensor
    alone: bool
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, step_id: _Optional[int] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., token_ids: _Optional[_Union[Tensor, _Mapping]] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., alone: _Optional[bool] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("seq_id", "token_id", "logprob")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_id: int
    logprob: float
    def __init__(self, seq_id: _Optional[int] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    seconds: float
    def __init__(self, stage: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "tokens", "error", "timings")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    tokens: _containers.RepeatedCompositeFieldContainer[SampledToken]
    error: str
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, step_id: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[SampledToken, _Mapping]]] = ..., error: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("dtype", "quantize", "group_size", "volume", "layer")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    quantize: str
    group_size: int
    volume: int
    layer: LayerShape
    def __init__(self, dtype: _Optional[str] = ..., quantize: _Optional[str] = ..., group_size: _Optional[int] = ..., volume: _Optional[int] = ..., layer: _Optional[_Union[LayerShape, _Mapping]] = ...) -> None: ...

class LayerShape(_message.Message):
    __slots__ = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "context")
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KEY_VALUE_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    context: int
    def __init__(self, model_type: _Optional[str] = ..., hidden_size: _Optional[int] = ..., intermediate_size: _Optional[int] = ..., num_attention_heads: _Optional[int] = ..., num_key_value_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., context: _Optional[int] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("hostname", "engine", "device_type", "memory_total", "memory_available", "model", "layer_start", "layer_end", "num_layers", "live_sequences", "version", "protocol_version", "weight_bytes", "device_name", "quantize", "read_bandwidth", "flop_rate", "kv_bytes_per_token", "kv_memory", "step_port", "read_bandwidth_alone", "decode_flop_rate", "layer_token_seconds", "layer_prompt_seconds", "layer_step_seconds", "compute", "layer_token_seconds_alone", "step_socket")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    READ_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    FLOP_RATE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_MEMORY_FIELD_NUMBER: _ClassVar[int]
    STEP_PORT_FIELD_NUMBER: _ClassVar[int]
    READ_BANDWIDTH_ALONE_FIELD_NUMBER: _ClassVar[int]
    DECODE_FLOP_RATE_FIELD_NUMBER: _ClassVar[int]
    LAYER_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_PROMPT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    LAYER_TOKEN_SECONDS_ALONE_FIELD_NUMBER: _ClassVar[int]
    STEP_SOCKET_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    engine: str
    device_type: str
    memory_total: int
    memory_available: int
    model: str
    layer_start: int
    layer_end: int
    num_layers: int
    live_sequences: int
    version: str
    protocol_version: int
    weight_bytes: int
    device_name: str
    quantize: str
    read_bandwidth: float
    flop_rate: float
    kv_bytes_per_token: int
    kv_memory: int
    step_port: int
    read_bandwidth_alone: float
    decode_flop_rate: float
    layer_token_seconds: float
    layer_prompt_seconds: float
    layer_step_seconds: float
    compute: str
    layer_token_seconds_alone: float
    step_socket: str
    def __init__(self, hostname: _Optional[str] = ..., engine: _Optional[str] = ..., device_type: _Optional[str] = ..., memory_total: _Optional[int] = ..., memory_available: _Optional[int] = ..., model: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_layers: _Optional[int] = ..., live_sequences: _Optional[int] = ..., version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., device_name: _Optional[str] = ..., quantize: _Optional[str] = ..., read_bandwidth: _Optional[float] = ..., flop_rate: _Optional[float] = ..., kv_bytes_per_token: _Optional[int] = ..., kv_memory: _Optional[int] = ..., step_port: _Optional[int] = ..., read_bandwidth_alone: _Optional[float] = ..., decode_flop_rate: _Optional[float] = ..., layer_token_seconds: _Optional[float] = ..., layer_prompt_seconds: _Optional[float] = ..., layer_step_seconds: _Optional[float] = ..., compute: _Optional[str] = ..., layer_token_seconds_alone: _Optional[float] = ..., step_socket: _Optional[str] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model", "layer_start", "layer_end", "dtype", "next_stage", "engine", "quantize", "group_size", "weights_from", "weights_key")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NEXT_STAGE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FROM_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_KEY_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer_start: int
    layer_end: int
    dtype: str
    next_stage: str
    engine: str
    quantize: str
    group_size: int
    weights_from: str
    weights_key: str
    def __init__(self, model: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., dtype: _Optional[str] = ..., next_stage: _Optional[str] = ..., engine: _Optional[str] = ..., quantize: _Optional[str] = ..., group_size: _Optional[int] = ..., weights_from: _Optional[str] = ..., weights_key: _Optional[str] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("fraction", "message", "done", "error", "phase", "bytes_done", "bytes_total")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    message: str
    done: bool
    error: str
    phase: str
    bytes_done: int
    bytes_total: int
    def __init__(self, fraction: _Optional[float] = ..., message: _Optional[str] = ..., done: _Optional[bool] = ..., error: _Optional[str] = ..., phase: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("seq_ids",)
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("live_sequences",)
    LIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    live_sequences: int
    def __init__(self, live_sequences: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("model", "message")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    message: str
    def __init__(self, model: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class EchoRequest(_message.Message):
    __slots__ = ("payload", "echo_payload")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ECHO_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    echo_payload: bool
    def __init__(self, payload: _Optional[bytes] = ..., echo_payload: _Optional[bool] = ...) -> None: ...

class EchoReply(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("address", "rounds", "payload_bytes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    address: str
    rounds: int
    payload_bytes: int
    def __init__(self, address: _Optional[str] = ..., rounds: _Optional[int] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("round_trip", "bandwidth", "error")
    ROUND_TRIP_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    round_trip: float
    bandwidth: float
    error: str
    def __init__(self, round_trip: _Optional[float] = ..., bandwidth: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class ShareRequest(_message.Message):
    __slots__ = ("key", "layer_start", "layer_end")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    key: str
    layer_start: int
    layer_end: int
    def __init__(self, key: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class ShareFile(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ShareReply(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[ShareFile]
    def __init__(self, files: _Optional[_Iterable[_Union[ShareFile, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("key", "layer_start", "layer_end", "name")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    key: str
    layer_start: int
    layer_end: int
    name: str
    def __init__(self, key: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("data", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...
