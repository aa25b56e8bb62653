"""How much one client may ask of the models: denoising work per request, requests in flight.

``check_generate`` refuses (422) a /v1/generate request over ``limits.max_n``, ``max_steps`` or
``max_image_steps`` (n x steps: one request holds the generator for all of its work).
``ClientSlots`` counts the requests each client has in flight on the model routes and answers 429
past ``limits.max_concurrent_per_client``. A client is its API token (hashed) when tokens are in
force, else its IP address. Every message names the limit and the key that raises it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException, Request

from serve.args import Limits
from serve.errors import InputError

WHERE = "serve/config.yaml"  # args.limits of the Serve config


def check_generate(n: int, steps: int, lim: Limits) -> None:
    """422 when one /v1/generate request asks for more than the limits allow."""
    if n > lim.max_n:
        raise InputError(f"n={n} is over the limit: 1..{lim.max_n} (raise limits.max_n in {WHERE})")
    if steps > lim.max_steps:
        raise InputError(
            f"steps={steps} is over the limit: 1..{lim.max_steps} "
            f"(raise limits.max_steps in {WHERE})"
        )
    if n * steps > lim.max_image_steps:
        raise InputError(
            f"n x steps = {n} x {steps} = {n * steps} denoising steps is over "
            f"limits.max_image_steps = {lim.max_image_steps}: ask for fewer images or steps, "
            f"or raise limits.max_image_steps in {WHERE}"
        )


def client_key(request: Request, tokens: list[str]) -> str:
    """Who is asking: the bearer token's hash when tokens are in force, else the peer's IP."""
    auth = request.headers.get("authorization", "")
    if tokens and auth[:7].lower() == "bearer ":
        return "token:" + hashlib.sha256(auth[7:].strip().encode()).hexdigest()[:16]
    return "ip:" + (request.client.host if request.client else "unknown")


class ClientSlots:
    """Requests in flight per client; ``hold`` answers 429 past ``limit``.

    A plain lock, not an asyncio one: the count is shared by every event loop of the process.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            n = self.held.get(key, 0)
            if n >= self.limit:
                raise HTTPException(
                    429,
                    f"this client already has {n} model requests in flight "
                    f"(limits.max_concurrent_per_client = {self.limit}): wait for one to finish, "
                    f"or raise limits.max_concurrent_per_client in {WHERE}",
                    headers={"Retry-After": "1"},
                )
            self.held[key] = n + 1
        try:
            yield
        finally:
            with self._lock:
                self.held[key] -= 1
                if not self.held[key]:
                    del self.held[key]
