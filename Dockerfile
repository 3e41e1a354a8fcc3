# The web app on an NVIDIA GPU:
#   docker build -t afnext .
#   docker run --gpus all -p 7860:7860 -v hf-cache:/home/afnext/.cache/huggingface \
#              -v afnext-data:/home/afnext/.local/share/afnext afnext
# Extra flags go to `python -m app`, e.g. `docker run … afnext --think-model think`.
#
# Two stages: flash-attn is published as source only and needs nvcc and torch to build, so it is
# built in the CUDA devel image; the app runs in the (smaller) runtime image with the same Ubuntu,
# whose python3 the copied virtualenv points at.
ARG CUDA=13.0.1
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA}-devel-${UBUNTU} AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1
COPY requirements.txt /tmp/requirements.txt
# PyPI's torch wheel (pinned in requirements.txt) is the CUDA build. onnxruntime-gpu stands in for
# onnxruntime: they install the same module, so the CPU one is left out rather than overwritten.
RUN grep -v '^onnxruntime' /tmp/requirements.txt > /tmp/requirements-gpu.txt \
    && pip install -r /tmp/requirements-gpu.txt onnxruntime-gpu \
    && pip install --no-deps pipecat-ai==1.14.0  # only for Smart Turn's model file (afnext/turn.py)
# Ampere (8.0) and Hopper (9.0); add "89" for L4/L40S-only images to skip the PTX JIT.
ARG FLASH_ATTN_CUDA_ARCHS="80;90"
RUN pip install ninja packaging wheel \
    && FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS}" MAX_JOBS=8 pip install flash-attn --no-build-isolation

FROM nvidia/cuda:${CUDA}-runtime-${UBUNTU}
RUN apt-get update && apt-get install -y --no-install-recommends python3 curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 1000 afnext \
    && mkdir -p /home/afnext/.cache/huggingface /home/afnext/.local/share/afnext \
    && chown -R afnext:afnext /home/afnext/.cache /home/afnext/.local
WORKDIR /home/afnext/app
COPY --chown=afnext:afnext afnext afnext
COPY --chown=afnext:afnext app app
COPY --chown=afnext:afnext assets assets
USER afnext
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HOME=/home/afnext/.cache/huggingface
# The downloaded weights (16.5 GB per AF-Next checkpoint) outlive the container here.
VOLUME /home/afnext/.cache/huggingface
# Kept conversations and recordings (the app's --data): history outlives the container here.
VOLUME /home/afnext/.local/share/afnext
EXPOSE 7860
# The first start downloads the model: give it time before failed checks count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD curl -fsS http://127.0.0.1:7860/health >/dev/null || exit 1
ENTRYPOINT ["python", "-m", "app", "--host", "0.0.0.0", "--port", "7860"]
