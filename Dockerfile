# keyroute: one image for the operator and the sidecar (`keyroute operator`, `keyroute sidecar`).
#
#   docker build -t REGISTRY/keyroute:0.1.0 .
#
# The base is pinned by tag, not digest, on purpose: a digest nobody could verify when writing this
# (no registry access here) would be a worse pin than a tag. Pin a digest in your own build pipeline
# if you mirror the base image. Both stages MUST use the same image: the venv built in the first one
# points at its interpreter, /usr/local/bin/python3.11.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first: this layer is rebuilt only when the lock changes.
# docker/install.sh is the one install procedure; tests/unit/test_image.py runs it too.
COPY docker/install.sh docker/install.sh
COPY requirements/image.txt requirements/image.txt
RUN ["docker/install.sh", "/opt/keyroute"]
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN ["python", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", "/dist", "."]
RUN ["docker/install.sh", "/opt/keyroute", "/dist"]

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="keyroute" \
      org.opencontainers.image.description="Kubernetes operator and sidecar for LLM credential routing" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
ENV PATH=/opt/keyroute/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=builder /opt/keyroute /opt/keyroute
# The chart runs it with runAsNonRoot, runAsUser 65532 and a read-only root filesystem.
USER 65532:65532
# 8411 sidecar proxy (127.0.0.1 only), 8412 sidecar metrics/health,
# 8080 operator metrics, 8081 operator liveness, 9443 operator webhook.
EXPOSE 8411 8412 8080 8081 9443
ENTRYPOINT ["keyroute"]
CMD ["--help"]
