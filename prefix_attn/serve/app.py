"""The OpenAI-compatible HTTP layer (Starlette, run by uvicorn) over the Engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as
server-sent events), GET /v1/models, GET /health, and the admin endpoints POST /admin/adapters
({"name", "path"}: load) and DELETE /admin/adapters/{name} (unload). A request's "model" names
the adapter; the base model's name (or no "model") is the base model without a prefix.

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 for a bad request
(limits included), 404 for an unknown adapter, 429 when --max-queue requests are admitted
already, 503 while shutting down or when the engine died, 504 past --request-timeout (the
request is cancelled in the engine). A client that disconnects cancels its request.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, List, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .engine import AdapterError, Engine, QueueFull


@dataclass
class Limits:
    max_new_tokens: int = 256      # the largest max_tokens a request may ask for
    max_context: int = 2048        # prompt + max_tokens
    request_timeout: float = 300.0  # seconds from admission to the last token


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.status}}, status_code=self.status, headers=headers)


_ids = itertools.count()
#: How often a waiting request checks its client, the engine and its deadline (seconds).
POLL_SECONDS = 0.25


class Server:
    def __init__(self, engine: Engine, tokenizer, base_name: str, limits: Limits):
        self.engine, self.tokenizer, self.base_name, self.limits = engine, tokenizer, base_name, limits
        self.accepting = True
        self.in_flight: dict = {}  # request id -> its asyncio.Queue of outputs

    # -- parsing --------------------------------------------------------------------------------

    def _adapter(self, body: dict) -> Optional[str]:
        model = body.get("model")
        if model is None or model == self.base_name or model == "":
            return None
        if not isinstance(model, str):
            raise HTTPError(400, "'model' must be a string", param="model")
        if model not in self.engine.adapters:
            raise HTTPError(404, f"the model {model!r} does not exist: loaded adapters are "
                                 f"{sorted(self.engine.adapters)} and the base model {self.base_name!r}",
                            "not_found_error", "model")
        return model

    def _sampling(self, body: dict) -> int:
        for key in ("n", "best_of"):
            if body.get(key, 1) not in (1, None):
                raise HTTPError(400, f"'{key}' must be 1: one completion per request", param=key)
        temperature = body.get("temperature")
        if temperature not in (None, 0, 0.0):
            raise HTTPError(400, "only greedy decoding is served: 'temperature' must be 0 or absent",
                            param="temperature")
        if body.get("stop"):
            raise HTTPError(400, "'stop' sequences are not supported", param="stop")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise HTTPError(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}", param="max_tokens")
        if max_tokens > self.limits.max_new_tokens:
            raise HTTPError(400, f"'max_tokens' is {max_tokens}; this server generates at most "
                                 f"{self.limits.max_new_tokens} tokens per request", param="max_tokens")
        return max_tokens

    def _check_context(self, ids: List[int], max_tokens: int) -> None:
        if not ids:
            raise HTTPError(400, "the prompt is empty", param="prompt")
        vocab = self.engine.model.config.get_text_config().vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise HTTPError(400, f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if len(ids) + max_tokens > self.limits.max_context:
            raise HTTPError(400, f"this model's context is {self.limits.max_context} tokens; the prompt has "
                                 f"{len(ids)} and max_tokens asks for {max_tokens} more", param="max_tokens")

    def _completion_ids(self, body: dict) -> List[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise HTTPError(400, "this server has no tokenizer: send 'prompt' as a list of token ids",
                                param="prompt")
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise HTTPError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                        param="prompt")

    def _chat_ids(self, body: dict) -> List[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise HTTPError(400, "'messages' must be a non-empty list of {'role', 'content'} with string content",
                            param="messages")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise HTTPError(400, "this server's tokenizer has no chat template; use /v1/completions", param="messages")
        ids = self.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                 add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def _decode(self, tokens: List[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- running a request ----------------------------------------------------------------------

    async def _run(self, request: Request, adapter: Optional[str], ids: List[int], max_tokens: int, stream: bool):
        """Admit and submit; yields the engine's outputs (cumulative tokens) until the last one.
        Cancels the request in the engine on timeout, disconnect or any error on our side."""
        if not self.accepting:
            raise HTTPError(503, "the server is shutting down", "server_error")
        if not self.engine.alive:
            raise HTTPError(503, "the generation engine is not running", "server_error")
        try:
            slot = self.engine.admit(adapter)
        except QueueFull as exc:
            raise HTTPError(429, f"too many requests: {exc}", "rate_limit_error")
        except KeyError:
            raise HTTPError(404, f"the model {adapter!r} does not exist", "not_found_error", "model")
        request_id = f"pa-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        outputs: asyncio.Queue = asyncio.Queue()
        self.in_flight[request_id] = outputs
        finished = False
        submitted = False
        try:
            self.engine.manager.register_result_handler(request_id, outputs.put_nowait)
            self.engine.submit(request_id, slot, ids, max_tokens, streaming=stream)
            submitted = True
            deadline = time.monotonic() + self.limits.request_timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HTTPError(504, f"the request took longer than {self.limits.request_timeout} s "
                                         "(--request-timeout); it was cancelled", "timeout_error")
                try:
                    # A short wait, then the checks: a waiter per request polling without pause
                    # would hold the GIL the generation thread needs.
                    output = await asyncio.wait_for(outputs.get(), timeout=min(left, POLL_SECONDS))
                except asyncio.TimeoutError:
                    # streaming responses notice a disconnect themselves (Starlette cancels them)
                    if not stream and await request.is_disconnected():
                        raise HTTPError(499, "the client closed the connection", "client_closed")
                    if not self.engine.alive:
                        raise HTTPError(503, "the generation engine stopped", "server_error")
                    continue
                if output is None:  # shutdown with the request unfinished
                    raise HTTPError(503, "the server shut down before the request finished", "server_error")
                if output.error is not None:
                    raise HTTPError(500, f"generation failed: {output.error}", "server_error")
                done_now = output.is_finished()
                if done_now:
                    finished = True
                yield output
                if done_now:
                    return
        finally:
            self.in_flight.pop(request_id, None)
            if submitted and not finished:
                with self.engine.manager.output_router._lock:
                    self.engine.manager.output_router.result_handlers.pop(request_id, None)
            self.engine.release(request_id, slot, cancel=submitted and not finished)

    def fail_in_flight(self) -> None:
        """Shutdown: wake every waiting request with 'no more output'."""
        for outputs in list(self.in_flight.values()):
            outputs.put_nowait(None)

    # -- endpoints ------------------------------------------------------------------------------

    async def _body(self, request: Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return body

    async def completions(self, request: Request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool):
        try:
            body = await self._body(request)
            adapter = self._adapter(body)
            max_tokens = self._sampling(body)
            ids = self._chat_ids(body) if chat else self._completion_ids(body)
            self._check_context(ids, max_tokens)
            stream = bool(body.get("stream", False))
            model_name = adapter or self.base_name
            created = int(time.time())
            outputs = self._run(request, adapter, ids, max_tokens, stream)
            if stream:
                first = await outputs.__anext__()  # admission errors become HTTP errors, not a broken stream
                return StreamingResponse(self._sse(outputs, first, model_name, created, chat, max_tokens),
                                         media_type="text/event-stream")
            last = None
            async for last in outputs:
                pass
        except HTTPError as exc:
            return exc.response()
        tokens = list(last.generated_tokens)
        text = self._decode(tokens)
        finish = "length" if len(tokens) >= max_tokens else "stop"
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(tokens), "total_tokens": len(ids) + len(tokens)}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "token_ids": tokens}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None, "token_ids": tokens}
            kind = "text_completion"
        return JSONResponse({"id": last.request_id, "object": kind, "created": created, "model": model_name,
                             "choices": [choice], "usage": usage})

    async def _sse(self, outputs, first, model_name: str, created: int, chat: bool, max_tokens: int):
        kind = "chat.completion.chunk" if chat else "text_completion"
        sent_tokens: List[int] = []
        sent_text = ""
        request_id = first.request_id

        def chunk(delta_text: str, delta_ids: List[int], finish: Optional[str]) -> str:
            if chat:
                delta: dict[str, Any] = {"content": delta_text} if delta_text or delta_ids else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "token_ids": delta_ids}
            else:
                choice = {"index": 0, "text": delta_text, "finish_reason": finish, "logprobs": None,
                          "token_ids": delta_ids}
            return "data: " + json.dumps({"id": request_id, "object": kind, "created": created, "model": model_name,
                                          "choices": [choice]}) + "\n\n"

        if chat:
            yield "data: " + json.dumps({"id": request_id, "object": kind, "created": created, "model": model_name,
                                         "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                      "finish_reason": None}]}) + "\n\n"

        async def all_outputs():
            yield first
            async for o in outputs:
                yield o

        try:
            async for output in all_outputs():
                tokens = list(output.generated_tokens)
                new_ids = tokens[len(sent_tokens):]
                text = self._decode(tokens)
                finished = output.is_finished()
                if text.endswith("\ufffd") and not finished:  # half a character: wait for the rest
                    new_text = ""
                else:
                    new_text, sent_text = text[len(sent_text):], text
                sent_tokens = tokens
                finish = None
                if finished:
                    finish = "length" if len(tokens) >= max_tokens else "stop"
                if new_ids or new_text or finish:
                    yield chunk(new_text, new_ids, finish)
        except HTTPError as exc:
            yield "data: " + json.dumps({"error": {"message": exc.message, "type": exc.type,
                                                   "code": exc.status}}) + "\n\n"
        finally:
            await outputs.aclose()
        yield "data: [DONE]\n\n"

    async def models(self, request: Request):
        now = int(time.time())
        names = [self.base_name] + sorted(self.engine.adapters)
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": now, "owned_by": "prefix_attn",
             **({"parent": self.base_name} if n != self.base_name else {})} for n in names]})

    async def health(self, request: Request):
        ok = self.accepting and self.engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    async def load_adapter(self, request: Request):
        try:
            body = await self._body(request)
            name, path = body.get("name"), body.get("path")
            if not isinstance(name, str) or not isinstance(path, str):
                raise HTTPError(400, "the body must be {'name': str, 'path': str}")
            if name == self.base_name:
                raise HTTPError(400, f"{name!r} is the base model's name", param="name")
            try:
                slot = await asyncio.get_running_loop().run_in_executor(None, self.engine.load_adapter, name, path)
            except AdapterError as exc:
                raise HTTPError(400, f"adapter {name!r} refused: {exc}", param="path")
        except HTTPError as exc:
            return exc.response()
        return JSONResponse({"name": name, "slot": slot, "loaded": True})

    async def unload_adapter(self, request: Request):
        name = request.path_params["name"]
        try:
            self.engine.unload_adapter(name)
        except KeyError:
            return HTTPError(404, f"no adapter named {name!r} is loaded", "not_found_error").response()
        return JSONResponse({"name": name, "loaded": False})


def build_app(engine: Engine, tokenizer=None, *, base_name: str = "base", limits: Optional[Limits] = None,
              shutdown_grace: float = 10.0) -> Starlette:
    """The Starlette app. On shutdown (after uvicorn stopped taking connections and waited for open
    ones) new requests get 503, requests still running get `shutdown_grace` seconds to finish,
    then the engine stops and whatever is left is answered 503."""
    server = Server(engine, tokenizer, base_name, limits or Limits())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.accepting = False
        deadline = time.monotonic() + shutdown_grace
        while server.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        server.fail_in_flight()
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        print("prefix_attn.serve: stopped", file=sys.stderr, flush=True)

    app = Starlette(routes=[
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/admin/adapters", server.load_adapter, methods=["POST"]),
        Route("/admin/adapters/{name}", server.unload_adapter, methods=["DELETE"]),
    ], lifespan=lifespan)
    app.state.server = server
    return app
