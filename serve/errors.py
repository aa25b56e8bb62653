"""HTTP errors shared by every route: the error body, input errors and their status codes.

Every 4xx/5xx body is ``{"detail": "..."}``. Bad input is never a 5xx: unknown class or image id,
criterion or subtype, out-of-range values and undecodable images are 422, oversized bodies or
images 413, missing or wrong tokens 401. 503 means a component is not configured or not loaded;
504 a model did not answer within ``request_timeout_s``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pathloop import schemas as S
from serve.models import BadImage, ImageTooLarge

UNAUTH = {"WWW-Authenticate": "Bearer"}  # headers of every 401
ERRORS = {
    401: {"model": S.ErrorResponse, "description": "Missing or wrong bearer token."},
    413: {"model": S.ErrorResponse, "description": "Body or image over the limits."},
    422: {"model": S.ErrorResponse, "description": "Invalid request; the detail says why."},
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


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)


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
        return error_response(504, str(err) or "the model did not answer in time")
