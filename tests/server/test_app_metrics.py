"""/metrics: requests, tokens, latencies and per-stage step times in Prometheus' text format."""

from __future__ import annotations


def test_metrics_count_requests_tokens_and_stage_steps(http, model) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "ignore_eos": True,
    }
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    http.post("/v1/chat/completions", json={**body, "max_tokens": 0})
    text = http.get("/metrics").text
    assert 'meshllm_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'meshllm_requests_total{endpoint="/v1/chat/completions",status="400"}' in text
    assert "meshllm_prompt_tokens_total" in text and "meshllm_generation_tokens_total" in text
    assert "meshllm_time_to_first_token_seconds_count" in text
    assert "meshllm_time_per_output_token_seconds_count" in text
    assert 'meshllm_stage_step_seconds_count{stage="coordinator"}' in text
    # Every worker reports its own compute time with each step's result; "remote chain" is the round trip.
    assert 'meshllm_stage_step_seconds_count{stage="worker1"}' in text
    assert 'meshllm_stage_step_seconds_count{stage="remote chain"}' in text
    assert "meshllm_live_sequences" in text
    generated = next(line for line in text.splitlines() if line.startswith("meshllm_generation_tokens_total"))
    assert float(generated.split()[-1]) >= 4
