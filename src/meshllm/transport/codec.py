"""The step types of `meshllm.step` to and from protobuf: the one place where they meet the wire.

Decoding checks everything a step says about itself before any array is built: a tensor's bytes match
its shape and dtype, the segments' tokens add up to the input's rows, positions and counts are in range,
sampling parameters are numbers a sampler can use, hidden states are finite. A step that fails a check is
a `MalformedStep` naming the field; what depends on the loaded model (hidden size, vocabulary, what each
cache holds) is checked by the stage host.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from meshllm.defaults import MODEL_TYPES
from meshllm.devices import Calibration, LayerShape, StageInfo
from meshllm.step import (
    LayerRange,
    MalformedStep,
    SampledToken,
    SamplingParams,
    Segment,
    StageTiming,
    StepInput,
    StepResult,
)
from meshllm.transport import tensors
from meshllm.transport.proto import meshllm_pb2 as pb


def encode_segment(segment: Segment) -> pb.Segment:
    params = segment.sampling
    return pb.Segment(
        seq_id=segment.seq_id,
        start_pos=segment.start_pos,
        n_tokens=segment.n_tokens,
        sample=segment.sample,
        sampled=segment.sampled,
        sampling=pb.Sampling(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            min_tokens=params.min_tokens,
            eos_token_ids=list(params.eos_token_ids),
        ),
    )


# Bounds no real step comes near; larger ones are refused before anything is allocated.
MAX_STEP_TOKENS = 1 << 20  # tokens of one step
MAX_SEGMENTS = 1 << 16  # segments of one step
MAX_POSITION = 1 << 40  # a segment's last position
MAX_HIDDEN = 1 << 20  # width of the hidden states


def decode_segment(message: pb.Segment) -> Segment:
    params = message.sampling
    return Segment(
        seq_id=message.seq_id,
        start_pos=message.start_pos,
        n_tokens=message.n_tokens,
        sample=message.sample,
        sampled=message.sampled if message.HasField("sampled") else None,
        sampling=SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed if params.HasField("seed") else None,
            min_tokens=params.min_tokens,
            eos_token_ids=tuple(params.eos_token_ids),
        ),
    )


def encode_step(step: StepInput) -> pb.StepRequest:
    request = pb.StepRequest(
        step_id=step.step_id, segments=[encode_segment(s) for s in step.segments], alone=step.alone
    )
    if step.token_ids is not None:
        request.token_ids.CopyFrom(tensors.encode(np.asarray(step.token_ids, dtype=np.int64)))
    if step.hidden_states is not None:
        request.hidden_states.CopyFrom(tensors.encode(step.hidden_states))
    return request


def decode_step(request: pb.StepRequest, framework: str) -> StepInput:
    """A StepInput whose hidden states are in `framework` ('torch' or 'mlx'); a MalformedStep naming the
    field when the message does not describe a step."""
    step = f"step {request.step_id}"
    segments = [
        _checked_segment(message, f"{step}: segment {i}") for i, message in enumerate(request.segments)
    ]
    if not segments:
        raise MalformedStep(f"{step}: no segments")
    if len(segments) > MAX_SEGMENTS:
        raise MalformedStep(f"{step}: {len(segments)} segments, more than {MAX_SEGMENTS}")
    seq_ids = [segment.seq_id for segment in segments]
    if len(set(seq_ids)) != len(seq_ids):
        raise MalformedStep(f"{step}: a sequence appears in more than one segment")
    n_tokens = sum(segment.n_tokens for segment in segments)
    if n_tokens > MAX_STEP_TOKENS:
        raise MalformedStep(f"{step}: {n_tokens} tokens, more than {MAX_STEP_TOKENS}")
    has_ids, has_hidden = request.HasField("token_ids"), request.HasField("hidden_states")
    if has_ids == has_hidden:
        raise MalformedStep(f"{step}: carries {'both' if has_ids else 'neither'} token_ids and hidden_states")
    hidden_states: Any = None
    token_ids = None
    if has_hidden:
        host = _checked_tensor(request.hidden_states, f"{step}: hidden_states", 2, _FLOATS)
        rows, width = host.shape
        if rows != n_tokens or not 0 < width <= MAX_HIDDEN:
            raise MalformedStep(f"{step}: hidden_states of shape {list(host.shape)} for {n_tokens} tokens")
        if not _finite(host, request.hidden_states.dtype):
            raise MalformedStep(f"{step}: hidden_states hold NaN or infinite values")
        hidden_states = tensors.decode(request.hidden_states, framework)
    else:
        token_ids = _checked_tensor(request.token_ids, f"{step}: token_ids", 1, _INTEGERS).astype(np.int64)
        if token_ids.shape[0] != n_tokens:
            raise MalformedStep(f"{step}: {token_ids.shape[0]} token ids for {n_tokens} tokens")
        if n_tokens and int(token_ids.min()) < 0:
            raise MalformedStep(f"{step}: token_ids hold a negative id")
    return StepInput(
        step_id=request.step_id,
        segments=segments,
        token_ids=token_ids,
        hidden_states=hidden_states,
        alone=request.alone,
    )


_FLOATS = ("float32", "float16", "bfloat16")
_INTEGERS = ("int64", "int32")


def _checked_tensor(message: pb.Tensor, name: str, ndim: int, dtypes: tuple[str, ...]) -> np.ndarray:
    """A numpy view of `message`'s bytes once its dtype, rank and size agree with each other."""
    if message.dtype not in dtypes:
        raise MalformedStep(f"{name}: dtype {message.dtype!r} is not one of {', '.join(dtypes)}")
    shape = list(message.shape)
    if len(shape) != ndim or any(size < 0 for size in shape):
        raise MalformedStep(f"{name}: shape {shape} is not {ndim}-dimensional")
    expected = int(np.prod(shape, dtype=object)) * tensors.numpy_dtype(message.dtype).itemsize
    if expected != len(message.data):
        raise MalformedStep(
            f"{name}: {len(message.data)} bytes for shape {shape} of {message.dtype} ({expected})"
        )
    return tensors.to_numpy(message.data, shape, message.dtype)


def _finite(host: np.ndarray, dtype: str) -> bool:
    if dtype == "bfloat16":  # uint16 bit patterns: an all-ones exponent is an infinity or a NaN
        return not bool(np.any((host & 0x7F80) == 0x7F80))
    return bool(np.isfinite(host).all())


def _checked_segment(message: pb.Segment, name: str) -> Segment:
    if not 0 < message.n_tokens:
        raise MalformedStep(f"{name}: n_tokens {message.n_tokens} must be at least 1")
    if not 0 <= message.start_pos <= MAX_POSITION - message.n_tokens:
        raise MalformedStep(f"{name}: start_pos {message.start_pos} is out of range")
    if message.HasField("sampled") and message.sampled < 0:
        raise MalformedStep(f"{name}: sampled {message.sampled} must not be negative")
    params = message.sampling
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise MalformedStep(f"{name}: temperature {params.temperature} must be a number >= 0")
    if not 0 < params.top_p <= 1:  # NaN fails too
        raise MalformedStep(f"{name}: top_p {params.top_p} must be in (0, 1]")
    if params.top_k < 0 or params.min_tokens < 0:
        raise MalformedStep(f"{name}: top_k and min_tokens must not be negative")
    return decode_segment(message)


def forward_step(request: pb.StepRequest, hidden_states: Any) -> pb.StepRequest:
    """The request for the next stage: the same step and segments (not decoded and encoded again), with
    this stage's output as its hidden states."""
    forwarded = pb.StepRequest(step_id=request.step_id, segments=request.segments, alone=request.alone)
    forwarded.hidden_states.CopyFrom(tensors.encode(hidden_states))
    return forwarded


def encode_result(result: StepResult) -> pb.StepResult:
    return pb.StepResult(
        step_id=result.step_id,
        tokens=[
            pb.SampledToken(seq_id=t.seq_id, token_id=t.token_id, logprob=t.logprob) for t in result.tokens
        ],
        timings=[pb.StageTiming(stage=t.stage, seconds=t.seconds) for t in result.timings],
    )


def decode_result(message: pb.StepResult) -> StepResult:
    return StepResult(
        step_id=message.step_id,
        tokens=[SampledToken(t.seq_id, t.token_id, t.logprob) for t in message.tokens],
        timings=[StageTiming(t.stage, t.seconds) for t in message.timings],
    )


def encode_info(info: StageInfo) -> pb.InfoReply:
    start, end = info.layers or (0, 0)
    return pb.InfoReply(
        hostname=info.hostname,
        engine=info.engine,
        device_type=info.device_type,
        device_name=info.device_name,
        memory_total=info.memory_total,
        memory_available=info.memory_available,
        model=info.model,
        layer_start=start,
        layer_end=end,
        num_layers=info.num_layers,
        live_sequences=info.live_sequences,
        weight_bytes=info.weight_bytes,
        version=info.version,
        protocol_version=info.protocol_version,
        quantize=info.quantize,
        kv_bytes_per_token=info.kv_bytes_per_token,
        kv_memory=info.kv_memory,
        compute=info.compute,
    )


def encode_layer_shape(shape: LayerShape) -> pb.LayerShape:
    return pb.LayerShape(**shape._asdict())


MAX_LAYER_CONTEXT = 1 << 16


def decode_layer_shape(message: pb.LayerShape) -> LayerShape:
    """The shape a calibration times; a ValueError naming the field when it could be no model's."""
    shape = LayerShape(**{name: getattr(message, name) for name in LayerShape._fields})
    if shape.model_type not in MODEL_TYPES:
        raise ValueError(f"layer model_type {shape.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    for name in LayerShape._fields[1:]:
        if getattr(shape, name) <= 0:
            raise ValueError(f"layer {name} must be positive, not {getattr(shape, name)}")
    if shape.num_attention_heads % shape.num_key_value_heads:
        raise ValueError(
            f"layer num_attention_heads {shape.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {shape.num_key_value_heads}"
        )
    if shape.context > MAX_LAYER_CONTEXT:
        raise ValueError(f"layer context {shape.context} is over {MAX_LAYER_CONTEXT} tokens")
    return shape


def decode_info(reply: pb.InfoReply) -> StageInfo:
    loaded = reply.layer_end > reply.layer_start
    return StageInfo(
        hostname=reply.hostname,
        engine=reply.engine,
        device_type=reply.device_type,
        device_name=reply.device_name,
        memory_total=reply.memory_total,
        memory_available=reply.memory_available,
        model=reply.model,
        layers=LayerRange(reply.layer_start, reply.layer_end) if loaded else None,
        num_layers=reply.num_layers,
        live_sequences=reply.live_sequences,
        weight_bytes=reply.weight_bytes,
        version=reply.version,
        protocol_version=reply.protocol_version,
        quantize=reply.quantize,
        kv_bytes_per_token=reply.kv_bytes_per_token,
        kv_memory=reply.kv_memory,
        step_port=reply.step_port,
        step_socket=reply.step_socket,
        calibration=decode_calibration(reply) if reply.read_bandwidth else None,
        compute=reply.compute,
    )


# Calibration's fields and the InfoReply fields that carry them
_CALIBRATION_FIELDS = {
    "read_bandwidth": "read_bandwidth",
    "flop_rate": "flop_rate",
    "alone_read_bandwidth": "read_bandwidth_alone",
    "decode_flop_rate": "decode_flop_rate",
    "layer_token_seconds": "layer_token_seconds",
    "layer_prompt_seconds": "layer_prompt_seconds",
    "layer_step_seconds": "layer_step_seconds",
    "layer_token_seconds_alone": "layer_token_seconds_alone",
}


def encode_calibration(reply: pb.InfoReply, calibration: Calibration) -> None:
    for name, wire in _CALIBRATION_FIELDS.items():
        setattr(reply, wire, getattr(calibration, name))


def decode_calibration(reply: pb.InfoReply) -> Calibration:
    return Calibration(**{name: getattr(reply, wire) for name, wire in _CALIBRATION_FIELDS.items()})
