"""The engine protocol: what every engine (torch, mlx) offers the runtime.

A stage owns the half-open range of decoder layers `[start, end)` of one checkpoint. The first stage also
embeds token ids; the last also applies the final norm and the lm_head. Layer indices and weight names
stay global, so a stage's weights are found by their Hugging Face names.

A step is a batch of segments. Each segment is `n_tokens` new tokens of one sequence starting at absolute
position `start_pos`; the step concatenates the tokens of all its segments, in order, into one `[T, ...]`
input so that every linear layer runs once for the whole step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from meshllm.errors import ConfigError
from meshllm.models.checkpoint import Checkpoint


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


@dataclass
class StepInput:
    """What a stage consumes: token ids on the first stage, hidden states from the previous one after."""

    step_id: int
    segments: list[Segment]
    token_ids: np.ndarray | None = None  # [T] int64, first stage only
    hidden_states: Any = None  # [T, hidden] engine tensor (torch.Tensor or mx.array)

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


class Stage(Protocol):
    """Layers `[start, end)` of one checkpoint, with a KV cache per live sequence."""

    engine: str  # "torch" | "mlx"
    layer_range: tuple[int, int]
    is_first: bool
    is_last: bool

    @property
    def device_type(self) -> str:
        """Where the weights live: cpu | cuda | mps | metal."""
        ...

    def forward(self, step: StepInput) -> StepOutput: ...

    def release(self, seq_ids: list[int]) -> None:
        """Drop the KV caches of these sequences; unknown ids are ignored."""

    def live_sequences(self) -> int: ...

    def weight_bytes(self) -> int:
        """Bytes of parameters this stage holds."""
        ...


def validate_layer_range(layer_range: tuple[int, int], num_layers: int) -> tuple[int, int]:
    """`layer_range` as a checked `(start, end)`: non-empty and within the model's layers."""
    start, end = layer_range
    if not (0 <= start < end <= num_layers):
        raise ConfigError(f"layer range [{start}, {end}) is out of bounds: the model has {num_layers} layers")
    return start, end


@dataclass(frozen=True)
class StageBounds:
    """A checked request for a stage: the open checkpoint and where the range sits in the model."""

    checkpoint: Checkpoint
    layer_range: tuple[int, int]
    is_first: bool
    is_last: bool


def stage_bounds(
    checkpoint: Checkpoint | str, layer_range: tuple[int, int], dtype: str, dtypes: Iterable[str]
) -> StageBounds:
    """Open `checkpoint` (a Checkpoint or a reference), check the range and the dtype an engine offers."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint.open(checkpoint)
    num_layers = checkpoint.config.num_hidden_layers
    start, end = layer_range  # may be a list (read from JSON)
    start, end = validate_layer_range((start, end), num_layers)
    dtypes = list(dtypes)
    if dtype not in dtypes:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(dtypes)}")
    return StageBounds(checkpoint, (start, end), start == 0, end == num_layers)
