"""The embedded model server's entry point: llama.cpp's OpenAI-compatible server with a chat
handler that honours ``tool_choice`` (run by ``manage.py llm_serve`` as
``python -m agents.llm_server <llama_cpp.server arguments> --chat_format portal-tools``).

llama-cpp-python's own handlers ignore ``tool_choice: "auto"`` and ``"required"`` for a model
without a tool-calling template, and its ``chatml-function-calling`` format cannot stream them
(docs/local-model-tools.md). This handler, registered as ``portal-tools``:

- no tools, ``tool_choice`` absent, ``"none"`` or ``"auto"``, and no tool messages in the
  conversation: the GGUF's own chat template, exactly as before (plain chat);
- ``"auto"`` with tool messages in the conversation: a plain answer that reads the tool results
  (SmolLM2-135M cannot judge when a tool is needed, so ``"auto"`` never calls one);
- ``"required"``: one call of one of the offered tools: the name is chosen by the model under a
  grammar that allows only the offered names (the only tool when there is one), then the
  arguments are generated under a grammar built from the tool's JSON Schema (without long length
  bounds, ``grammar_schema``), so they always parse and match the schema's shape;
- a named choice (``{"type": "function", "function": {"name": ...}}``): that tool's arguments, as
  above.

The server also accepts an assistant message with ``"content": null`` (what OpenAI clients send
back with tool calls), which llama-cpp-python itself refuses (``AssistantContentFill``).

Tool calls stream as OpenAI does: the first delta of the call carries ``id``, ``type`` and the
name, later deltas only ``arguments`` fragments; the last chunk has ``finish_reason:
"tool_calls"``. This module must not import Django: it runs in the model server's process.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

CHAT_FORMAT = "portal-tools"
DEFAULT_TEMPLATE = "chat_template.default"
END = "<|im_end|>"
SIZE_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
GRAMMAR_MAX_REPEAT = 16
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Sampling options of the request passed on to the completion.
SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "seed",
    "max_tokens",
    "model",
)


def _text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if isinstance(part, dict))


def render_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation as a ChatML prompt ending with the assistant's turn.

    ``tools`` (OpenAI ``tools`` entries), when given, are listed after the system message. An
    assistant's tool calls are written as ``Called <name> with <arguments>`` and a ``tool``
    message as a user turn ``Result of <name>: <content>`` (SmolLM2 knows no tool role).
    """
    names_by_call: dict[str, str] = {}
    system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") == "system")
    if tools:
        lines = [f"- {t['function']['name']}: {t['function'].get('description') or ''}".rstrip() for t in tools]
        system = (system + "\n\n" if system else "") + "Tools:\n" + "\n".join(lines)
    parts = [f"<|im_start|>system\n{system}{END}\n"] if system else []
    for message in messages:
        role = message.get("role")
        if role == "system":
            continue
        if role == "assistant":
            text = _text(message.get("content"))
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                names_by_call[call.get("id") or ""] = function.get("name") or ""
                text += ("\n" if text else "") + f"Called {function.get('name')} with {function.get('arguments')}"
            parts.append(f"<|im_start|>assistant\n{text}{END}\n")
        elif role == "tool":
            name = names_by_call.get(message.get("tool_call_id") or "", "the tool")
            parts.append(f"<|im_start|>user\nResult of {name}: {_text(message.get('content'))}{END}\n")
        else:
            parts.append(f"<|im_start|>user\n{_text(message.get('content'))}{END}\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def grammar_schema(schema: Any) -> Any:
    """``schema`` without the keywords that make llama.cpp's grammar too large to use.

    A ``maxLength`` or ``maxItems`` becomes one grammar repetition per allowed character or item,
    and past a few hundred llama.cpp refuses the grammar while sampling, which stalls the server;
    ``pattern`` and ``format`` are dropped too. Bounds up to ``GRAMMAR_MAX_REPEAT`` are kept. The
    caller still validates the arguments against the full schema."""
    if isinstance(schema, list):
        return [grammar_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("pattern", "format"):
            continue
        if key in SIZE_KEYWORDS and (not isinstance(value, int) or value > GRAMMAR_MAX_REPEAT):
            continue
        if key in SCHEMA_MAPS and isinstance(value, dict):  # names of properties, not keywords
            out[key] = {name: grammar_schema(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in ("enum", "const", "default", "examples") else grammar_schema(value)
    return out


def _name_grammar(names: list[str]) -> str:
    # Tool names match ^[a-zA-Z0-9_-]{1,64}$, so they need no escaping inside GBNF quotes.
    return "root ::= " + " | ".join(f'"{name}"' for name in names)


def _sampling(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {name: kwargs[name] for name in SAMPLING if kwargs.get(name) is not None}


def _call_chunks(name: str, call_id: str, chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    first = True
    base: dict[str, Any] = {}
    for chunk in chunks:
        base = {
            "id": "chat" + chunk["id"],
            "object": "chat.completion.chunk",
            "created": chunk["created"],
            "model": chunk["model"],
        }
        text = chunk["choices"][0]["text"]
        if first:
            call: dict[str, Any] = {
                "index": 0,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": text},
            }
            delta: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
            first = False
        elif text:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
        else:
            continue
        yield {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
    if base:
        yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]}


def _call_response(name: str, call_id: str, completion: dict[str, Any]) -> dict[str, Any]:
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": completion["choices"][0]["text"]},
    }
    return {
        "id": "chat" + completion["id"],
        "object": "chat.completion",
        "created": completion["created"],
        "model": completion["model"],
        "choices": [
            {
                "index": 0,
                "logprobs": None,
                "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
            }
        ],
        "usage": completion["usage"],
    }


def portal_tools_handler(
    *,
    llama: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    tool_choice: Any = None,
    stream: bool = False,
    **kwargs: Any,
) -> Any:
    """llama-cpp-python chat completion handler (the ``portal-tools`` chat format; see the module
    docstring for what each ``tool_choice`` does). Returns a chat completion dict, or an iterator
    of chunk dicts when ``stream``. Raises ``ValueError`` for a named choice not in ``tools``."""
    from llama_cpp import llama_chat_format, llama_grammar

    tools = tools or []
    has_tool_turns = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    wants_call = bool(tools) and (named is not None or tool_choice == "required")
    sampling = _sampling(kwargs)
    if not wants_call and not has_tool_turns:
        default: Any = llama._chat_handlers.get(DEFAULT_TEMPLATE) or llama_chat_format.get_chat_completion_handler(
            "chatml"
        )
        return default(llama=llama, messages=messages, stream=stream, **kwargs)
    if not wants_call:
        completion = llama.create_completion(prompt=render_prompt(messages), stream=stream, stop=[END], **sampling)
        return llama_chat_format._convert_completion_to_chat(completion, stream=stream)

    by_name = {t["function"]["name"]: t for t in tools}
    prompt = render_prompt(messages, tools)
    if named is not None:
        if named not in by_name:
            raise ValueError(f"Tool choice '{named}' not found in tools.")
        name = named
    elif len(by_name) == 1:
        name = next(iter(by_name))
    else:
        choice = llama.create_completion(
            prompt=prompt + "Tool: ",
            stream=False,
            max_tokens=64,
            temperature=0.0,
            stop=[END],
            grammar=llama_grammar.LlamaGrammar.from_string(_name_grammar(list(by_name)), verbose=False),
        )
        name = choice["choices"][0]["text"].strip()
        if name not in by_name:  # the grammar allows only these names; a cut-off answer falls back
            name = next(iter(by_name))
    parameters = by_name[name]["function"].get("parameters") or {"type": "object", "properties": {}}
    try:
        grammar = llama_grammar.LlamaGrammar.from_json_schema(json.dumps(grammar_schema(parameters)), verbose=False)
    except Exception:  # a schema the converter cannot express: any JSON value instead
        grammar = llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    completion = llama.create_completion(
        prompt=prompt + f"Tool: {name}\nArguments: ", stream=stream, stop=[END], grammar=grammar, **sampling
    )
    if stream:
        return _call_chunks(name, call_id, completion)
    return _call_response(name, call_id, completion)


def assistant_content_fill(body: bytes) -> bytes:
    """A chat completion request body with ``"content": null`` of assistant messages made ``""``.

    OpenAI clients send an assistant message that only calls tools with ``content: null``;
    llama-cpp-python's request model types it as a string and answers HTTP 500. Any other body
    (not JSON, no messages) is returned unchanged."""
    try:
        request = json.loads(body)
    except ValueError:
        return body
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        return body
    changed = False
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "assistant" and message.get("content", "") is None:
            message["content"] = ""
            changed = True
    return json.dumps(request).encode() if changed else body


class AssistantContentFill:
    """ASGI middleware applying ``assistant_content_fill`` to ``POST …/chat/completions``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = assistant_content_fill(body)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:  # later reads wait for the client to disconnect, as the server expects
                return dict(await receive())
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def register() -> None:
    """Registers ``portal_tools_handler`` as llama-cpp-python's chat format ``portal-tools``."""
    from llama_cpp import llama_chat_format

    llama_chat_format.register_chat_completion_handler(CHAT_FORMAT)(portal_tools_handler)


def main() -> None:
    """``python -m llama_cpp.server`` with the ``portal-tools`` chat format registered and the app
    wrapped in ``AssistantContentFill``; takes the same arguments (``sys.argv``)."""
    register()
    import llama_cpp.server.app as server_app

    create_app = server_app.create_app

    def create_app_filled(*args: Any, **kwargs: Any) -> Any:
        return AssistantContentFill(create_app(*args, **kwargs))

    # llama_cpp.server.__main__ imports create_app by name, so it is replaced before that import.
    server_app.create_app = create_app_filled
    from llama_cpp.server.__main__ import main as serve

    sys.argv[0] = "llama_cpp.server"
    serve()


if __name__ == "__main__":
    main()
