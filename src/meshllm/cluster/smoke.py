"""`meshllm cluster test`: one chat completion through the API; prints the reply and the tokens per second."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx

from meshllm.config import Cluster
from meshllm.errors import MeshError


def chat_once(
    cluster: Cluster, prompt: str = "Hello!", max_tokens: int = 32, echo: Callable[[str], None] = print
) -> int:
    url = cluster.api_url
    headers = {"Authorization": f"Bearer {cluster.cluster.api_key}"} if cluster.cluster.api_key else {}
    request = {
        "model": _served_model(url, headers) or cluster.cluster.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }
    started = time.perf_counter()
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json=request, headers=headers, timeout=300.0)
    except httpx.HTTPError as error:
        raise MeshError(
            f"no answer from the API at {url} ({error or type(error).__name__}); is the cluster running? "
            f"(`meshllm cluster status -c {cluster.path}`)"
        ) from None
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise MeshError(f"the API at {url} answered {response.status_code}: {_error_message(response)}")
    body = response.json()
    reply = body["choices"][0]["message"]["content"] or ""
    tokens = int((body.get("usage") or {}).get("completion_tokens") or 0)
    echo(f"{json.dumps(reply, ensure_ascii=False)} · {tokens} tokens · {tokens / elapsed:.1f} tok/s")
    return 0


def _served_model(url: str, headers: dict[str, str]) -> str | None:
    """The model id the API serves (clients must send it), or None to fall back to the file's model."""
    try:
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10.0).json()["data"]
        return models[0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:300] or "no message"
