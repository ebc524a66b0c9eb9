"""The OpenAI-compatible HTTP API of the coordinator.

`protocol` holds the request and response models, `serving` the logic (chat template, detokenising, stop
strings, usage), `app` the thin FastAPI routes, `metrics` the Prometheus metrics, `errors` the error
shapes, and `serve_cli` the `meshllm serve` command.
"""
