"""HTTP middleware that `vllm serve` runs with this plugin, on by default (the
platform puts them at the head of vLLM's ``--middleware`` list; a user's own
``--middleware`` entries are added after them).

- ``RequireApiKey``: vLLM checks ``--api-key`` (or VLLM_API_KEY) only on paths
  under /v1, /v2, /inference and /cohere, so /invocations (which generates),
  /tokenize, /pause, /abort_requests, /metrics and others answer anyone. With a
  key configured, every route needs it (OPTIONS, for CORS preflight, excepted).
- ``BoundedQueue``: with ``VLLM_METAL_MAX_WAITING_REQUESTS=N``, at most
  ``--max-num-seqs`` + N generation requests are admitted at a time; past that a
  new one gets HTTP 429 at once (with Retry-After), and the admitted ones run as
  before. Unset, requests queue without bound, as in vLLM.
"""

import hashlib
import json
import os
import secrets

from vllm_metal import envs

GENERATION_PATHS = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages",
    "/invocations", "/inference/v1/generate",
})
MIDDLEWARE = ["vllm_metal.serving.RequireApiKey", "vllm_metal.serving.BoundedQueue"]


async def _reply(send, status: int, message: str, kind: str, headers=()) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def _state(scope):
    app = scope.get("app")
    return getattr(app, "state", None)


class RequireApiKey:
    def __init__(self, app):
        self.app = app
        self._hashes: list[bytes] | None = None

    def _key_hashes(self, scope) -> list[bytes]:
        if self._hashes is None:
            args = getattr(_state(scope), "args", None)
            keys = [k for k in (getattr(args, "api_key", None) or
                                [os.environ.get("VLLM_API_KEY")]) if k]
            self._hashes = [hashlib.sha256(k.encode()).digest() for k in keys]
        return self._hashes

    def _authorized(self, scope, hashes: list[bytes]) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode()).digest()
        return any(secrets.compare_digest(digest, h) for h in hashes)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and scope.get("method") != "OPTIONS":
            hashes = self._key_hashes(scope)
            if hashes and not self._authorized(scope, hashes):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await _reply(send, 401, "Unauthorized: this server needs its API key "
                             "(Authorization: Bearer KEY) on every route", "Unauthorized")
                return
        await self.app(scope, receive, send)


class BoundedQueue:
    def __init__(self, app):
        self.app = app
        self.admitted = 0

    def _limit(self, scope) -> int | None:
        waiting = envs.VLLM_METAL_MAX_WAITING_REQUESTS
        if waiting is None:
            return None
        config = getattr(_state(scope), "vllm_config", None)
        running = config.scheduler_config.max_num_seqs if config is not None else 0
        return running + waiting

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or \
                scope["path"].removeprefix(scope.get("root_path", "")) not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        if limit is not None and self.admitted >= limit:
            await _reply(send, 429, f"the server is at its limit of {limit} requests "
                         "(--max-num-seqs running plus VLLM_METAL_MAX_WAITING_REQUESTS "
                         "waiting); retry later", "TooManyRequests",
                         headers=[(b"retry-after", b"1")])
            return
        self.admitted += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admitted -= 1
