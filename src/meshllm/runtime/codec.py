"""Steps to and from the wire: the one place where engine payloads meet protobuf messages."""

from __future__ import annotations

from typing import Any

import numpy as np

from meshllm.engines.base import SampledToken, SamplingParams, Segment, StepInput
from meshllm.transport import tensors
from meshllm.transport.proto import meshllm_pb2 as pb


def encode_segment(segment: Segment) -> pb.Segment:
    params = segment.sampling
    return pb.Segment(
        seq_id=segment.seq_id,
        start_pos=segment.start_pos,
        n_tokens=segment.n_tokens,
        sample=segment.sample,
        sampling=pb.Sampling(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed or 0,
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
        sampling=SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
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


def encode_tokens(step_id: int, tokens: list[SampledToken]) -> pb.StepResult:
    return pb.StepResult(
        step_id=step_id,
        tokens=[pb.SampledToken(seq_id=t.seq_id, token_id=t.token_id, logprob=t.logprob) for t in tokens],
    )


def decode_tokens(result: pb.StepResult) -> list[SampledToken]:
    return [SampledToken(t.seq_id, t.token_id, t.logprob) for t in result.tokens]
