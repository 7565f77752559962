# nlm inference image, SageMaker bring-your-own-container compatible:
# SageMaker runs `docker run IMAGE serve`, mounts the model at /opt/ml/model and calls port 8080.
# CPU build by default; for GPUs build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/nlm
RUN pip install --index-url "${TORCH_INDEX}" "torch>=2.4"
COPY pyproject.toml README.md ./
COPY nlm ./nlm
RUN pip install ".[serve]" && useradd --create-home --uid 1000 nlm

USER nlm
EXPOSE 8080
# Exec form: `serve` is PID 1 and receives SIGTERM directly (graceful shutdown). `serve [flags]` passes flags
# on to `nlm serve`; the default model folder is /opt/ml/model and the bind address 0.0.0.0:8080.
ENTRYPOINT ["serve"]
