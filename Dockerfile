# syntax=docker/dockerfile:1
# Two images from one file:
#   --target flower  Celery + Flower, no torch (Flower needs only the app's broker settings)
#   --target worker  the GPU worker: torch (the CUDA build from PyPI), transformers, PEFT, bitsandbytes
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 1000 app
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
COPY producer ./producer

FROM base AS flower
RUN pip install . "flower>=2.0"
USER app
EXPOSE 5555
CMD ["celery", "-A", "worker", "flower", "--port=5555"]

FROM base AS worker
ARG TORCH_SPEC=torch==2.13.0
RUN pip install "${TORCH_SPEC}" && pip install ".[worker]"
# NVML answers torch.cuda.is_available(), so no CUDA context is made before a fork (docs/gpu.md).
ENV HF_HOME=/cache/huggingface PYTORCH_NVML_BASED_CUDA_CHECK=1
RUN mkdir -p /cache/huggingface && chown app /cache/huggingface
USER app
# The batching GPU worker: one process, 32 threads sharing forward passes, time limits enforced.
CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO", "--pool=threads", "--concurrency=32"]
