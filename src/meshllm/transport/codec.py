"""The step types of `meshllm.step` to and from protobuf: the one place where they meet the wire."""

from __future__ import annotations

from typing import Any

import numpy as np

from meshllm.devices import StageInfo
from meshllm.step import (
    LayerRange,
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
    request = pb.StepRequest(step_id=step.step_id, segments=[encode_segment(s) for s in step.segments])
    if step.token_ids is not None:
        request.token_ids.CopyFrom(tensors.encode(np.asarray(step.token_ids, dtype=np.int64)))
    if step.hidden_states is not None:
        request.hidden_states.CopyFrom(tensors.encode(step.hidden_states))
    return request


def decode_step(request: pb.StepRequest, framework: str) -> StepInput:
    """A StepInput whose hidden states are in `framework` ('torch' or 'mlx')."""
    hidden_states: Any = None
    token_ids = None
    if request.HasField("hidden_states"):
        hidden_states = tensors.decode(request.hidden_states, framework)
    if request.HasField("token_ids"):
        token_ids = tensors.decode(request.token_ids, "numpy")
    return StepInput(
        step_id=request.step_id,
        segments=[decode_segment(s) for s in request.segments],
        token_ids=token_ids,
        hidden_states=hidden_states,
    )


def forward_step(request: pb.StepRequest, hidden_states: Any) -> pb.StepRequest:
    """The request for the next stage: the same step and segments (not decoded and encoded again), with
    this stage's output as its hidden states."""
    forwarded = pb.StepRequest(step_id=request.step_id, segments=request.segments)
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
        read_bandwidth=info.read_bandwidth,
        flop_rate=info.flop_rate,
    )


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
        read_bandwidth=reply.read_bandwidth,
        flop_rate=reply.flop_rate,
    )
