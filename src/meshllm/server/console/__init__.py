"""The web console at `/`: one page (its HTML, JavaScript and CSS shipped in `static/`, nothing fetched
from elsewhere) and `/console/stats`, the JSON it polls about once a second.

With an API key configured, `/console/stats` without a key says only what `/health` and
`/distributed/gpu-info` already say (the devices, the model's name, the cluster's status, live
sequences); the charts' series and the context length want the key, like the chat's `/v1` requests.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from meshllm.devices import DeviceStatus
from meshllm.server.auth import UNAUTHORIZED_HEADERS, ApiKey, KeyCheck, unauthorized_body
from meshllm.server.console.stats import RecentSeries, RecentStats

if TYPE_CHECKING:  # serving imports the metrics, which import this package's stats
    from meshllm.server.serving import OpenAIServing

PACKAGE = "meshllm.server.console"

# The page runs only its own files: no inline script, nothing from another origin.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


class ConsoleStats(BaseModel):
    """What the console shows. `locked`: an API key is configured and was not sent, so only what /health
    and /distributed/gpu-info show is here (`max_context` and `series` are null)."""

    model: str
    cluster_status: Literal["healthy", "degraded"]
    devices: list[DeviceStatus]  # first stage first, as last seen by the coordinator
    num_layers: int  # the end of the last stage's range
    live_sequences: int
    locked: bool
    max_context: int | None = None
    series: RecentSeries | None = None


def console_stats(serving: OpenAIServing, recent: RecentStats, unlocked: bool) -> ConsoleStats:
    client = serving.client
    devices = client.devices_snapshot()  # no round trip to the workers: the monitor refreshes it
    healthy = client.healthy and all(device.healthy for device in devices)
    return ConsoleStats(
        model=serving.model_name,
        cluster_status="healthy" if healthy else "degraded",
        devices=devices,
        num_layers=max((device.layers.end for device in devices), default=0),
        live_sequences=client.live_sequences,
        locked=not unlocked,
        max_context=client.model.max_context if unlocked else None,
        series=recent.series() if unlocked else None,
    )


def add_console(app: FastAPI, serving: OpenAIServing, recent: RecentStats, api_key: ApiKey) -> None:
    static = resources.files(PACKAGE) / "static"
    page = (static / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def console_page() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/console/stats")
    async def stats(request: Request) -> JSONResponse:
        check = api_key.check(request.headers.get("authorization", "").encode() or None)
        if check is KeyCheck.WRONG:
            return JSONResponse(unauthorized_body(check), status_code=401, headers=UNAUTHORIZED_HEADERS)
        unlocked = check in (KeyCheck.OPEN, KeyCheck.GIVEN)
        body = console_stats(serving, recent, unlocked).model_dump(mode="json")
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    app.mount(
        "/console/static",
        StaticFiles(packages=[(PACKAGE, "static")]),
        name="console-static",
    )
