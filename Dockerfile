# syntax=docker/dockerfile:1
# The portal's image: one image for every Procfile role (web, celery, beat, rq, llm, tickets) and
# the migrations, chosen by the first argument (docker/entrypoint.sh) or by the Helm chart's
# command/args. Build: `docker build -t agent-ops-portal:0.1.0 .` (README, "Container image").
#
# Stage 1 (builder) has the compilers: it builds llama-cpp-python from source for AVX2 (the same
# CMAKE_ARGS as the Makefile: its default native build enables AVX-512/AMX kernels that crash on
# some virtual CPUs) and turns every requirement into a wheel. Stage 2 (runtime) is python slim
# with the wheels installed offline, no compiler, running as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential cmake git pkg-config \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    # torch==2.13.0 resolves to the CPU build (2.13.0+cpu) from PyTorch's CPU index, not the CUDA one.
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /build
COPY requirements.txt ./

# llama-cpp-python ships only as source: build it for AVX2 (Makefile, LLAMA_CMAKE_ARGS).
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
      -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    pip wheel --no-deps --wheel-dir /wheels "$(grep -E '^llama-cpp-python==' requirements.txt)"

# Every other requirement as a wheel (downloaded, or built here when only a source archive exists).
RUN pip wheel --wheel-dir /wheels --find-links /wheels -r requirements.txt

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# libgomp1: OpenMP runtime of llama.cpp's CPU kernels. Nothing else is compiled at run time.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    # litellm must never fetch its price map from the internet.
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    DJANGO_SETTINGS_MODULE=config.settings \
    PORTAL_VAR_DIR=/app/var \
    STATIC_ROOT=/app/staticfiles \
    XDG_CACHE_HOME=/tmp/.cache

# Offline install from the builder's wheels only: no index, no compiler.
COPY requirements.txt /tmp/requirements.txt
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The unprivileged user the Helm chart runs as (runAsUser/runAsGroup 10001).
RUN groupadd --system --gid 10001 portal \
    && useradd --system --uid 10001 --gid portal --home-dir /app --no-create-home --shell /usr/sbin/nologin portal

WORKDIR /app
COPY --chown=root:root . /app
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/portal-entrypoint

# Static files collected at build time into /app/staticfiles (WhiteNoise serves them; the chart's
# root filesystem is read-only). DATABASE_URL is set so that settings do not start the embedded
# development PostgreSQL; collectstatic opens no connection.
RUN DATABASE_URL=postgresql://collectstatic@127.0.0.1:1/none PORTAL_VAR_DIR=/tmp/build-var \
    python manage.py collectstatic --noinput --verbosity 0 \
    && rm -rf /tmp/build-var \
    && mkdir -p /app/var \
    && chown portal:portal /app/var

USER 10001:10001
EXPOSE 8000

ENTRYPOINT ["portal-entrypoint"]
CMD ["web"]
