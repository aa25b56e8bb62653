"""HTTP errors shared by every route: the error body, input errors and their status codes.

Every 4xx/5xx body is ``{"detail": "..."}``, one line naming the problem and the fix. Bad input
is never a 5xx: unknown class or image id, criterion or subtype, wrong JSON types, NaN, values
out of range and images undecodable or of the wrong size are 422, oversized bodies or images 413,
a body of the wrong content type 415, too many requests in flight 429, missing or wrong tokens
401. 503 means a component is not configured or not loaded; 504 a model did not answer within
``request_timeout_s``; 500 only a server bug (its traceback goes to the log, not the client).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pathloop import schemas as S
from serve.models import BadImage, ImageTooLarge

log = logging.getLogger(__name__)
UNAUTH = {"WWW-Authenticate": "Bearer"}  # headers of every 401
ERRORS = {
    401: {"model": S.ErrorResponse, "description": "Missing or wrong bearer token."},
    413: {"model": S.ErrorResponse, "description": "Body or image over the limits."},
    415: {"model": S.ErrorResponse, "description": "Body of a content type the route refuses."},
    422: {"model": S.ErrorResponse, "description": "Invalid request; the detail says why."},
    429: {"model": S.ErrorResponse, "description": "Too many requests in flight (limits)."},
    503: {"model": S.ErrorResponse, "description": "Component not configured or not loaded."},
    504: {"model": S.ErrorResponse, "description": "The model did not answer in time."},
}


class InputError(ValueError):
    """A library ValueError/KeyError caused by the request's content (HTTP 422)."""


@contextmanager
def input_errors() -> Iterator[None]:
    """Turn ValueError/KeyError raised on request values into InputError (422)."""
    try:
        yield
    except (ValueError, KeyError) as err:
        raise InputError(str(err.args[0]) if err.args else str(err)) from None


def error_response(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    """The ``{"detail": ...}`` body every error answers with."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


# What to send instead, by pydantic error type (strict mode: JSON types are taken as written).
HINTS = {
    "int_type": "send a JSON integer (not a string, a fraction or true/false)",
    "bool_type": "send JSON true or false (not a string or a number)",
    "float_type": "send a JSON number (not a string or true/false)",
    "string_type": "send a JSON string",
    "list_type": "send a JSON array",
    "finite_number": "NaN and infinity are not accepted: send a finite number",
    "model_attributes_type": "send a JSON object",
    "dict_type": "send a JSON object",
    "extra_forbidden": "unknown field: remove it (the schema at /openapi.json lists the fields)",
    "missing": "add it",
}


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        kind = e.get("type", "")
        if kind == "json_invalid":
            why = (e.get("ctx") or {}).get("error", "JSON decode error")
            parts.append(f"body is not valid JSON ({why}): send one JSON object")
            continue
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        hint = HINTS.get(kind)
        parts.append(f"{loc}: {e.get('msg')}" + (f"; {hint}" if hint else ""))
    return "invalid request: " + "; ".join(parts)


def _not_found(request: Request, status: int) -> str:
    what = f"{request.method} {request.url.path}"
    if status == 405:
        return f"{what}: method not allowed here; /openapi.json lists each route's methods"
    return f"no route {what}; /openapi.json lists the routes (with an API token, if tokens are set)"


def install_error_handlers(app: FastAPI) -> None:
    """Map request validation and input errors to 422, ImageTooLarge to 413, timeouts to 504."""
    from pathloop.feedback_db import FeedbackError

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(err))

    for kind in (FeedbackError, InputError, BadImage):

        @app.exception_handler(kind)
        async def _bad_input(_: Request, err: Exception) -> JSONResponse:
            return error_response(422, str(err))

    @app.exception_handler(ImageTooLarge)
    async def _too_large(_: Request, err: ImageTooLarge) -> JSONResponse:
        return error_response(413, str(err))

    @app.exception_handler(TimeoutError)
    async def _timeout(_: Request, err: TimeoutError) -> JSONResponse:
        msg = str(err) or "the model did not answer in time"
        return error_response(504, f"{msg}: retry, or raise request_timeout_s in the Serve config")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        detail = err.detail
        if err.status_code in (404, 405) and detail in ("Not Found", "Method Not Allowed"):
            detail = _not_found(request, err.status_code)  # Starlette's own, without a fix
        return error_response(err.status_code, str(detail), getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(
            500, f"internal error ({type(err).__name__}); the server log has the traceback"
        )
