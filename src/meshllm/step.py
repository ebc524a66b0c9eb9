"""The vocabulary every part shares: layer ranges, sampling parameters, segments, steps and their results.

A stage owns the half-open range of decoder layers `[start, end)` of one checkpoint. The first stage also
embeds token ids; the last also applies the final norm and the lm_head, and samples. Layer indices and
weight names stay global, so a stage's weights are found by their Hugging Face names.

A step is a batch of segments. Each segment is `n_tokens` new tokens of one sequence starting at absolute
position `start_pos`; the step concatenates the tokens of all its segments, in order, into one `[T, ...]`
input so that every linear layer runs once for the whole step.

Nothing here imports an engine, gRPC or a web framework: engines, the transport, the runtime, the server
and the cluster tools all speak these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from meshllm.errors import ConfigError, MeshError, StageError

FinishReason = Literal["stop", "length"]  # an eos or stop token or string; max_tokens reached


class LayerRange(NamedTuple):
    """Decoder layers `[start, end)`. A tuple, so `start, end = layer_range` and `range(*layer_range)` work
    and it travels as a two-element list in JSON."""

    start: int
    end: int

    @classmethod
    def checked(cls, layer_range: tuple[int, int], num_layers: int) -> LayerRange:
        """`layer_range` (a tuple, or a list read from JSON) as a range within a model of `num_layers`."""
        start, end = layer_range
        if not (0 <= start < end <= num_layers):
            raise ConfigError(
                f"layer range [{start}, {end}) is out of bounds: the model has {num_layers} layers"
            )
        return cls(int(start), int(end))

    @property
    def is_first(self) -> bool:
        """The stage embeds token ids."""
        return self.start == 0

    def is_last(self, num_layers: int) -> bool:
        """The stage normalises, projects to the vocabulary and samples."""
        return self.end == num_layers

    @property
    def size(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


@dataclass(frozen=True)
class SamplingParams:
    """How the last stage picks the next token of a sequence. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None  # None: a fresh random seed per sequence
    min_tokens: int = 0  # eos_token_ids are banned until this many tokens were sampled
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Segment:
    seq_id: int
    start_pos: int  # absolute position of the segment's first token in its sequence
    n_tokens: int
    sample: bool = False  # the last stage samples a token after this segment (end of prompt, or decode)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Tokens the sequence sampled before this segment (None: whatever the sampler holds). A sequence
    # prefilled again after a failure resumes its seeded sampler there, so it goes on with the same tokens.
    sampled: int | None = None


@dataclass
class StepInput:
    """What a stage consumes: token ids on the first stage, hidden states from the previous one after."""

    step_id: int
    segments: list[Segment]
    token_ids: np.ndarray | None = None  # [T] int64, first stage only
    hidden_states: Any = None  # [T, hidden] engine tensor (torch.Tensor or mx.array)
    # No other step was in flight when it was sent: a stage sharing its machine with other stages, idle
    # now, may use the machine's every core for it (`--threads-alone`).
    alone: bool = False

    @property
    def n_tokens(self) -> int:
        return sum(segment.n_tokens for segment in self.segments)


@dataclass
class StepOutput:
    """What a stage produces: hidden states for the next stage, or logits when it is the last."""

    step_id: int
    segments: list[Segment]
    hidden_states: Any = None  # [T, hidden], stages that are not last
    logits: np.ndarray | None = None  # [S, vocab] float32, last stage: the last token of every segment


@dataclass(frozen=True)
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float


@dataclass(frozen=True)
class StageTiming:
    """How long one stage computed one step (reported back with the step's tokens)."""

    stage: str
    seconds: float


@dataclass(frozen=True)
class StepResult:
    """What comes back for a step from the last stage: the sampled tokens and each stage's compute time."""

    step_id: int
    tokens: list[SampledToken]
    timings: list[StageTiming] = field(default_factory=list)


@dataclass(frozen=True)
class GeneratedToken:
    """One token of a sequence's stream, as the runtime hands it to the server."""

    token_id: int
    logprob: float
    finish_reason: FinishReason | None = None  # "stop" (an eos or stop token), "length" or None


class MalformedStep(StageError):
    """A step that does not describe work a stage can do (shapes that disagree with its segments, positions
    its caches do not hold, values no model produces). It is refused before any cache changes, so every
    other sequence goes on as if it never came."""


class PipelineError(MeshError):
    """A sequence could not be completed: a stage failed or is unreachable. The message names the device."""


class StageLost(PipelineError):
    """A link of the pipeline broke (a stage died or became unreachable): the step may succeed again once
    the pipeline is whole, so its sequences can be prefilled again rather than ended."""


class PipelineUnavailable(PipelineError):
    """The pipeline cannot take new sequences now (a device is down); the message names it."""
