"""The OpenAI-compatible HTTP API of the coordinator, and `meshllm serve`.

- `protocol`: the pydantic models of every request and response
- `serving`: the logic (chat template, lengths, sampling parameters, cluster endpoints); no web framework
- `checks`: features refused with a 400 naming the field, and messages as the template expects them
- `generation`: one sequence on the pipeline as text deltas; `text`: detokenising and stop strings
- `replies`: whole replies and stream payloads built from the deltas
- `app`: the thin FastAPI routes, error handlers, SSE, API key and request metrics
- `metrics`: the Prometheus metrics; `errors`: OpenAI's error shape
- `serve_cli`, `launch`: the `meshllm serve` command, its local workers and its uvicorn server
"""
