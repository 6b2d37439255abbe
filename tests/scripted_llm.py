"""A scripted OpenAI-compatible chat server over real HTTP, for deterministic model behaviour.

``POST /v1/chat/completions`` answers according to the script registered for the request's
``model`` (litellm sends ``openai/<name>`` as ``<name>``): the tokens to stream, the delay
before the first token and between tokens, and an optional failure:

- ``"status:500"`` (or any code): answer that HTTP status with an error body, no stream;
- ``"timeout"``: accept the request and send nothing for ``hang_seconds``;
- ``"cut"``: stream ``cut_after`` tokens, then close the connection without ``[DONE]``;
- ``"empty"``: a 200 stream that ends at once with no chunks and no ``[DONE]``.

A script may instead be a sequence of ``steps`` (``Step``), taken by the model's request count
(the first request gets ``steps[0]``, ...; the last step repeats): a step streams its ``tokens``
and/or its ``tool_calls`` (OpenAI ``tool_calls`` deltas: the id and name first, then the
arguments in fragments split across chunks, ending with ``finish_reason: "tool_calls"``)::

    llm.script(model, steps=[Step(tool_calls=[ScriptedCall("calculator", '{"expression": "2+2"}')]),
                             Step(tokens=["It is ", "4."])])

With ``steps_by="tool_rounds"`` the step is instead the number of the request's assistant
messages that carry tool calls (the first model call of a turn gets ``steps[0]``, the call after
its first round of tool results ``steps[1]``, ...), so that concurrent turns on one model each
follow the script.

Every request body is kept in ``requests`` (newest last), and the wall-clock time at which the
first token was written is kept per request in ``first_token_sent`` (``time.time()``), so the
platform's overhead can be measured against it. ``GET /v1/models`` lists the scripts.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ScriptedCall:
    """A tool call to stream: ``arguments`` is sent as is (it may be invalid JSON on purpose)."""

    name: str
    arguments: str = "{}"
    id: str = ""


@dataclass
class Step:
    """One answer of a stepped script: text tokens, then tool calls (either may be empty)."""

    tokens: list[str] = field(default_factory=list)
    tool_calls: list[ScriptedCall] = field(default_factory=list)
    first_token_delay: float = 0.0


ARGUMENT_FRAGMENT_CHARS = 7  # tool-call arguments are streamed in fragments of this many characters


@dataclass
class Script:
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "."])
    first_token_delay: float = 0.0
    token_interval: float = 0.0
    failure: str = ""
    cut_after: int = 2
    hang_seconds: float = 30.0
    usage: bool = True
    prompt_tokens: int = 42
    steps: list[Step] = field(default_factory=list)
    steps_by: str = "requests"  # or "tool_rounds": see the module docstring
    requests_before: int = 0


class ScriptedLLM:
    """The server; ``script(model, ...)`` sets a model's behaviour. Thread-safe enough for tests."""

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.requests: list[dict[str, Any]] = []
        self.first_token_sent: list[float] = []
        # Per request that streamed tool calls: (model, time.time() when its last tool-call delta was written).
        self.last_tool_delta_sent: list[tuple[str, float]] = []
        # Per request: (model, time.time() when the request arrived).
        self.request_arrived: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ScriptedLLM:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def script(self, model: str, **options: Any) -> Script:
        script = Script(**options)
        with self._lock:
            # Steps count the model's requests from now on.
            script.requests_before = sum(1 for r in self.requests if r.get("model") == model)
            self.scripts[model] = script
        return script

    def requests_for(self, model: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("model") == model]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
                return

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in owner.scripts]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                arrived = time.time()
                model = str(body.get("model"))
                with owner._lock:
                    seen = sum(1 for r in owner.requests if r.get("model") == model)
                    owner.requests.append(body)
                    owner.request_arrived.append((model, arrived))
                    script = owner.scripts.get(model, Script())
                seen -= script.requests_before
                index = seen
                if script.steps_by == "tool_rounds":
                    messages = body.get("messages") or []
                    index = sum(1 for m in messages if m.get("role") == "assistant" and m.get("tool_calls"))
                step = script.steps[min(index, len(script.steps) - 1)] if script.steps else None
                tokens = step.tokens if step is not None else script.tokens
                calls = step.tool_calls if step is not None else []
                if script.failure.startswith("status:"):
                    code = int(script.failure.split(":", 1)[1])
                    self._json(code, {"error": {"message": f"scripted failure {code}", "type": "server_error"}})
                    return
                if script.failure == "timeout":
                    time.sleep(script.hang_seconds)
                    return
                if not body.get("stream"):
                    text = "".join(tokens)
                    self._json(
                        200,
                        {
                            "id": "chatcmpl-scripted",
                            "object": "chat.completion",
                            "created": int(time.time()),
                            "model": body.get("model"),
                            "choices": [
                                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                            ],
                            "usage": {
                                "prompt_tokens": script.prompt_tokens,
                                "completion_tokens": len(tokens),
                                "total_tokens": script.prompt_tokens + len(tokens),
                            },
                        },
                    )
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                if script.failure == "empty":
                    self.wfile.flush()
                    self.close_connection = True
                    return
                time.sleep(step.first_token_delay if step is not None else script.first_token_delay)
                for i, token in enumerate(tokens):
                    if script.failure == "cut" and i >= script.cut_after:
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if i > 0 and script.token_interval:
                        time.sleep(script.token_interval)
                    chunk = {
                        "id": "chatcmpl-scripted",
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": body.get("model"),
                        "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}],
                    }
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    if i == 0:
                        with owner._lock:
                            owner.first_token_sent.append(time.time())
                for k, call in enumerate(calls):
                    call_id = call.id or f"call_{seen}_{k}"
                    head = {
                        "index": k,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                    size = ARGUMENT_FRAGMENT_CHARS
                    deltas = [head] + [
                        {"index": k, "function": {"arguments": call.arguments[j : j + size]}}
                        for j in range(0, len(call.arguments), size)
                    ]
                    for delta in deltas:
                        chunk = {
                            "id": "chatcmpl-scripted",
                            "object": "chat.completion.chunk",
                            "created": int(time.time()),
                            "model": body.get("model"),
                            "choices": [{"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": None}],
                        }
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                if calls:
                    with owner._lock:
                        owner.last_tool_delta_sent.append((model, time.time()))
                final: dict[str, Any] = {
                    "id": "chatcmpl-scripted",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": body.get("model"),
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls" if calls else "stop"}],
                }
                self.wfile.write(f"data: {json.dumps(final)}\n\n".encode())
                if script.usage and (body.get("stream_options") or {}).get("include_usage"):
                    usage = {
                        "id": "chatcmpl-scripted",
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": body.get("model"),
                        "choices": [],
                        "usage": {
                            "prompt_tokens": script.prompt_tokens,
                            "completion_tokens": len(tokens) + len(calls),
                            "total_tokens": script.prompt_tokens + len(tokens) + len(calls),
                        },
                    }
                    self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

        return Handler
