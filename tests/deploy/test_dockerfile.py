"""The Dockerfile's structure, and the image entrypoint's dispatch of the Procfile roles.

No Docker engine runs here, so the image is not built in the suite (README, "Container image",
says how). What is checked: the Dockerfile's stages (compilers only in the builder, llama.cpp
built with the Makefile's flags, an unprivileged user matching the Helm chart's, offline install
from the builder's wheels, static files collected, the litellm price map kept local), the
.dockerignore, and docker/entrypoint.sh itself: run for every Procfile role with stand-in
``uvicorn``/``celery``/``python`` programs on PATH that print what they were started with, it
must start the Procfile's command.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPILERS = ("build-essential", "gcc", "g++", "cmake", "make", "clang", "git")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def dockerfile_stages() -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of the Dockerfile: continuations joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current = f"{current} {line}" if current else line
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        logical.append(current)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"every stage is named: {line}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
            stages.append(Stage(match.group(2), base))
        elif keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def makefile_cmake_flags() -> set[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(r"^LLAMA_CMAKE_ARGS = (.+)$", text, re.MULTILINE)
    assert match
    return set(match.group(1).split())


def test_it_builds_in_a_builder_stage_and_runs_from_a_slim_one() -> None:
    _, stages = dockerfile_stages()
    assert [s.name for s in stages] == ["builder", "runtime"]
    builder, runtime = stages
    assert builder.base == runtime.base and re.fullmatch(r"python:3\.11-slim(-\w+)?", runtime.base)
    builder_installs = " ".join(builder.all("RUN"))
    assert "build-essential" in builder_installs and "cmake" in builder_installs
    for run in runtime.all("RUN"):
        if "apt-get install" in run:
            packages = set(run.split("apt-get install", 1)[1].split("&&", 1)[0].split())
            assert not packages & set(COMPILERS), packages
    # Nothing from the builder but its wheels reaches the runtime stage.
    assert all("from=builder" in run for run in runtime.all("RUN") if "builder" in run)
    assert not [c for c in runtime.all("COPY") if "--from=builder" in c]


def test_llama_cpp_is_built_with_the_makefiles_avx2_flags() -> None:
    _, (builder, _) = dockerfile_stages()
    (run,) = [r for r in builder.all("RUN") if "CMAKE_ARGS" in r]
    flags = set(re.search(r'CMAKE_ARGS="([^"]+)"', run).group(1).split())  # type: ignore[union-attr]
    assert flags == makefile_cmake_flags()
    assert "llama-cpp-python==" in run and "pip wheel" in run


def test_the_runtime_installs_offline_from_the_wheels_and_runs_unprivileged() -> None:
    _, (_, runtime) = dockerfile_stages()
    runs = " ".join(runtime.all("RUN"))
    assert re.search(r"pip install --no-index --find-links /wheels -r \S*requirements\.txt", runs)
    assert "manage.py collectstatic --noinput" in runs
    env = " ".join(runtime.all("ENV"))
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in env
    (user,) = runtime.all("USER")
    uid, _, gid = user.partition(":")
    assert uid not in ("0", "root") and gid not in ("0", "root")
    chart = yaml.safe_load((ROOT / "helm" / "values.yaml").read_text())
    assert int(uid) == chart["podSecurityContext"]["runAsUser"]
    assert f"--uid {uid}" in runs
    # USER comes after every RUN: nothing after it runs as root.
    keywords = [kw for kw, _ in runtime.instructions]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")
    assert runtime.all("ENTRYPOINT") == ['["portal-entrypoint"]']
    assert any("docker/entrypoint.sh /usr/local/bin/portal-entrypoint" in c for c in runtime.all("COPY"))


def test_dockerignore_keeps_local_state_out_and_the_project_in() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "var"} <= patterns
    for needed in ("manage.py", "requirements.txt", "docker", "config", "static", "templates"):
        assert needed not in patterns


def procfile() -> dict[str, list[str]]:
    roles = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip():
            role, command = line.split(": ", 1)
            roles[role] = shlex.split(command)
    return roles


@pytest.fixture
def stand_ins(tmp_path: Path) -> dict[str, str]:
    """PATH with uvicorn, celery and python programs that print their argv and the pool size."""
    for program in ("uvicorn", "celery", "python"):
        script = tmp_path / program
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "POOL=${{DATABASE_POOL_MAX_SIZE:-}}" {program} "$@"\n')
        script.chmod(0o755)
    return {"PATH": f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path)}


def entrypoint(env: dict[str, str], *args: str) -> list[str]:
    completed = subprocess.run(
        ["/bin/sh", str(ROOT / "docker" / "entrypoint.sh"), *args],  # noqa: S603
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return completed.stdout.splitlines()


@pytest.mark.parametrize("role", sorted(procfile()))
def test_every_procfile_role_starts_the_procfiles_command(role: str, stand_ins: dict[str, str]) -> None:
    expected = procfile()[role]
    assignments = dict(word.split("=", 1) for word in expected if re.fullmatch(r"[A-Z_]+=.*", word))
    command = [word for word in expected if not re.fullmatch(r"[A-Z_]+=.*", word)]
    pool, *started = entrypoint(stand_ins, role)
    assert pool == f"POOL={assignments.get('DATABASE_POOL_MAX_SIZE', '')}"
    assert started[0] == command[0]
    # Every option of the Procfile's command, with its value; the web server listens on every
    # address of the container instead of 127.0.0.1.
    values = {
        i + 1 for i, word in enumerate(command[:-1]) if word.startswith("-") and not command[i + 1].startswith("-")
    }
    for i, word in enumerate(command):
        if i in values:
            continue
        if i + 1 not in values:
            assert word in started, (word, started)
        elif word == "--host":
            assert started[started.index("--host") + 1] == "0.0.0.0"  # noqa: S104
        elif word == "--schedule":  # var/ of the project, absolute in the image
            assert started[started.index(word) + 1] == "/app/var/celerybeat-schedule"
        else:
            assert started[started.index(word) + 1] == command[i + 1], (word, started)


def test_migrate_runs_migrate_schemas_with_the_multiprocessing_executor(stand_ins: dict[str, str]) -> None:
    _, *started = entrypoint(stand_ins, "migrate")
    assert started == ["python", "manage.py", "migrate_schemas", "--noinput", "--executor=multiprocessing"]


def test_any_other_command_runs_as_given(stand_ins: dict[str, str]) -> None:
    assert entrypoint(stand_ins, "echo", "hello") == ["hello"]
    _, *started = entrypoint(stand_ins, "rq", "default")
    assert started == ["python", "manage.py", "rqworker", "default"]
