"""HTTP routes under /grassmann-lora/v1 (registered with script_callbacks.on_app_started).

    GET  /loras                       the WebUI's LoRAs (?refresh=1 rescans the folders)
    GET  /applied                     the last image's LoRAs: modules the WebUI matched / in the file
    POST /similarity /kernel /merge /convert /compare   JSON in, JSON out (see service.py)

Every answer is JSON; a bad request gets a 4xx and {"error": "<one line>"}. Heavy
work runs in the server's thread pool, never on its event loop.
"""
# no `from __future__ import annotations` here: FastAPI reads the endpoints' `request: Request`
# annotations at registration, and Request is imported inside register().
import base64
import io
import logging
import math

from . import service
from ..core.errors import LoraError

PREFIX = "/grassmann-lora/v1"
log = logging.getLogger("grassmann_lora")


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _similarity(body):
    answer, report = service.similarity(_without(body, "images"))
    if body.get("images"):
        answer["heatmap_png"] = _png(report.heatmap_image())
    return answer


def _kernel(body):
    answer, km, result = service.kernel(_without(body, "images"))
    if body.get("images"):
        answer["heatmap_png"] = _png(km.heatmap_image(result))
    return answer


def _merge(body):
    return service.merge(body)[0]


def _compare(body):
    from .compare import render
    answer, result = render(body)
    answer["grid_png"] = _png(result.grid)
    return answer


def _without(body, key):
    return {k: v for k, v in body.items() if k != key} if isinstance(body, dict) else body


HANDLERS = {"similarity": _similarity, "kernel": _kernel, "merge": _merge, "convert": service.convert,
            "compare": _compare}


def jsonable(x):
    """NaN and ±inf (dead modules, Martin distance at a right angle) as null: JSON has no such numbers."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def handle(op: str, body) -> tuple[int, dict]:
    """(HTTP status, JSON answer) for one request; never raises."""
    status, answer = _handle(op, body)
    return status, jsonable(answer)


def _handle(op: str, body) -> tuple[int, dict]:
    try:
        if op == "loras":
            return 200, {"loras": service.list_loras(refresh=bool(body and body.get("refresh")))}
        if op == "applied":
            return 200, {"applied": service.applied()}
        return 200, HANDLERS[op](body)
    except service.RequestError as err:
        return err.status, {"error": str(err)}
    except LoraError as err:
        return 400, {"error": " ".join(str(err).split())}
    except service.Interrupted:
        return 409, {"error": "interrupted"}
    except Exception as err:   # noqa: BLE001 - the server must answer, in one line
        log.exception("Grassmann LoRA: %s failed", op)
        return 500, {"error": f"{op} failed: {type(err).__name__}: {' '.join(str(err).split())}"}


def register(app) -> None:
    """Add the routes to the WebUI's FastAPI app."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    async def loras(request: Request):
        refresh = request.query_params.get("refresh", "") not in ("", "0", "false")
        status, answer = await run_in_threadpool(handle, "loras", {"refresh": refresh})
        return JSONResponse(answer, status_code=status)

    def post(op: str):
        async def endpoint(request: Request):
            try:
                body = await request.json()
            except Exception:   # noqa: BLE001 - any malformed body
                return JSONResponse({"error": "the request body is not valid JSON"}, status_code=400)
            status, answer = await run_in_threadpool(handle, op, body)
            return JSONResponse(answer, status_code=status)
        endpoint.__name__ = f"grassmann_lora_{op}"
        return endpoint

    async def applied(request: Request):
        status, answer = await run_in_threadpool(handle, "applied", {})
        return JSONResponse(answer, status_code=status)

    app.add_api_route(f"{PREFIX}/loras", loras, methods=["GET"])
    app.add_api_route(f"{PREFIX}/applied", applied, methods=["GET"])
    for op in HANDLERS:
        app.add_api_route(f"{PREFIX}/{op}", post(op), methods=["POST"])
