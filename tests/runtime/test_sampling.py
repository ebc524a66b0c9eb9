"""Sampling on the last stage: greedy, seeded draws, top-k, top-p, min_tokens and logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.runtime.sampling import Sampler, _inverse_cdf
from meshllm.step import SamplingParams, Segment

VOCAB = 64


def random_logits(rows: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 2.0, size=(rows, VOCAB)).astype(np.float32)


def sample_tokens(params: SamplingParams, n_tokens: int = 20, seq_id: int = 0) -> list[int]:
    """`n_tokens` tokens of one sequence, a fresh row of logits for each, from a fresh sampler."""
    sampler = Sampler()
    segment = Segment(seq_id, 0, 1, sample=True, sampling=params)
    return [sampler.sample([segment], random_logits(seed=step))[0].token_id for step in range(n_tokens)]


def greedy_tokens(n_tokens: int = 20) -> list[int]:
    return [int(random_logits(seed=step)[0].argmax()) for step in range(n_tokens)]


def exact_log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - np.log(np.exp(logits).sum())


def test_greedy_takes_the_argmax() -> None:
    assert sample_tokens(SamplingParams(temperature=0.0)) == greedy_tokens()


def test_only_segments_marked_sample_get_a_token() -> None:
    segments = [Segment(1, 0, 5), Segment(2, 3, 1, sample=True), Segment(3, 0, 2)]

    tokens = Sampler().sample(segments, random_logits(rows=3))

    assert [token.seq_id for token in tokens] == [2]


def test_same_seed_gives_the_same_tokens() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)

    assert sample_tokens(params) == sample_tokens(params)


def test_different_seeds_give_different_tokens() -> None:
    first = sample_tokens(SamplingParams(temperature=1.0, seed=1))
    second = sample_tokens(SamplingParams(temperature=1.0, seed=2))

    assert first != second


def test_sampling_at_a_temperature_is_not_greedy() -> None:
    assert sample_tokens(SamplingParams(temperature=1.5, seed=0)) != greedy_tokens()


def test_sequences_draw_from_their_own_generators() -> None:
    """A sequence's tokens depend on its seed alone, not on what else shares the step."""
    params = SamplingParams(temperature=1.0, seed=7)
    alone = sample_tokens(params)
    sampler = Sampler()
    together = []
    for step in range(20):
        segments = [
            Segment(0, 0, 1, sample=True, sampling=params),
            Segment(1, 0, 1, sample=True, sampling=SamplingParams(temperature=1.0, seed=8)),
        ]
        logits = np.concatenate([random_logits(seed=step), random_logits(seed=100 + step)])
        together.append(sampler.sample(segments, logits)[0].token_id)

    assert together == alone


def test_top_k_of_one_is_greedy() -> None:
    assert sample_tokens(SamplingParams(temperature=1.0, top_k=1, seed=3)) == greedy_tokens()


def test_tiny_top_p_is_greedy() -> None:
    assert sample_tokens(SamplingParams(temperature=1.0, top_p=1e-6, seed=3)) == greedy_tokens()


def test_top_k_keeps_to_the_k_most_likely() -> None:
    logits = random_logits()
    top_3 = set(np.argsort(-logits[0])[:3].tolist())
    sampler = Sampler()
    segments = [
        Segment(i, 0, 1, sample=True, sampling=SamplingParams(temperature=5.0, top_k=3, seed=i))
        for i in range(50)
    ]

    tokens = {token.token_id for token in sampler.sample(segments, np.repeat(logits, 50, axis=0))}

    assert tokens <= top_3 and len(tokens) > 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_bans_eos_until_reached(temperature: float) -> None:
    logits = np.zeros((1, VOCAB), dtype=np.float32)
    logits[0, [5, 9]] = 50.0  # both eos ids are far more likely than anything else
    params = SamplingParams(temperature=temperature, seed=0, min_tokens=3, eos_token_ids=(5, 9))
    sampler = Sampler()
    segment = Segment(0, 0, 1, sample=True, sampling=params)

    tokens = [sampler.sample([segment], logits)[0].token_id for _ in range(5)]

    assert all(token not in (5, 9) for token in tokens[:3])
    assert all(token in (5, 9) for token in tokens[3:])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.8, seed=0),
        SamplingParams(temperature=1.0, seed=0, min_tokens=10, eos_token_ids=(0, 1)),
    ],
    ids=["greedy", "temperature-top_k-top_p", "min_tokens"],
)
def test_logprob_is_the_log_softmax_of_the_unmodified_logits(params: SamplingParams) -> None:
    logits = random_logits(rows=1, seed=5)
    logits[0, 0] = logits[0].max() + 1.0  # eos 0 is the most likely token, so banning it matters

    token = Sampler().sample([Segment(0, 0, 1, sample=True, sampling=params)], logits)[0]

    assert token.logprob == pytest.approx(exact_log_softmax(logits[0])[token.token_id], abs=1e-6)


def exact_nucleus(logits: np.ndarray, top_p: float) -> set[int]:
    """The smallest set of likeliest tokens (ties by id) holding `top_p` of the mass, by a full sort."""
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order].astype(np.float64) - logits.max())
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
    return set(order[:keep].tolist())


def test_top_p_draws_only_from_the_smallest_set_holding_that_mass_over_a_large_vocabulary() -> None:
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(20_000) * 2.0).astype(np.float32)
    logits[:300] += rng.uniform(3.0, 9.0, 300).astype(np.float32)  # a head of likely tokens
    nucleus = exact_nucleus(logits, 0.8)
    segments = [
        Segment(i, 0, 1, sample=True, sampling=SamplingParams(temperature=1.0, top_p=0.8, seed=i))
        for i in range(400)
    ]

    drawn = {token.token_id for token in Sampler().sample(segments, np.tile(logits, (400, 1)))}

    assert drawn <= nucleus and len(drawn) > 20, (len(drawn), len(nucleus))


def test_top_p_over_tied_logits_keeps_the_lowest_ids() -> None:
    logits = np.zeros((200, VOCAB), dtype=np.float32)  # every token equally likely
    segments = [
        Segment(i, 0, 1, sample=True, sampling=SamplingParams(temperature=1.0, top_p=0.5, seed=i))
        for i in range(200)
    ]

    drawn = {token.token_id for token in Sampler().sample(segments, logits)}

    assert drawn <= set(range(VOCAB // 2)) and len(drawn) > VOCAB // 4


@pytest.mark.parametrize("size", [1, 700, 1024, 5000, 151_936])
def test_a_draw_picks_where_the_running_sum_passes_the_uniform_number(size: int) -> None:
    """The blocked running sum picks the token a whole-row running sum would, zero weights included."""
    rng = np.random.default_rng(size)
    weights = rng.exponential(size=size).astype(np.float32)
    weights[rng.random(size) < 0.3] = 0.0  # tokens that cannot be drawn
    weights[0] = max(weights[0], 1e-3)
    running = np.cumsum(weights, dtype=np.float64)
    uniforms = np.concatenate([rng.random(300), [0.0, 1e-12, 1 - 1e-12]])
    for uniform in uniforms:
        expected = min(int(np.searchsorted(running, uniform * running[-1], side="right")), size - 1)
        got = _inverse_cdf(weights, float(uniform))
        assert got == expected or abs(running[got] - running[expected]) < 1e-6 * running[-1], (uniform, got)
        assert weights[got] > 0 or uniform == 0.0
