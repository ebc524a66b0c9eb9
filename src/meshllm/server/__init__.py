"""The OpenAI-compatible HTTP API of the coordinator, against a typed engine client
(`meshllm.runtime.engine_client.EngineClient`) and nothing else of the runtime.

A request runs one way: `validation` -> prompt ids -> `generation` -> `replies`, orchestrated by
`serving`.

- `protocol`: the pydantic models of every request and response
- `validation`: features refused with a 400 naming the field, messages as the template expects them,
  stop strings, token ids and lengths; builds the `GenerateRequest` (pure: no I/O)
- `serving`: the orchestration of that line, and the model and cluster endpoints; no web framework
- `generation`: one sequence on the engine as text deltas, shared by chat and completions, streamed or
  not; `text`: detokenising and stop strings
- `replies`: the whole reply or the stream payloads made from the deltas, one small format per endpoint
- `app`: the thin FastAPI routes, error handlers, SSE, API key and request metrics
- `metrics`: the Prometheus metrics; `errors`: OpenAI's error shape
- `launch`: the API's socket and its uvicorn server (`meshllm serve` lives in `meshllm.cli.serve`)
"""
