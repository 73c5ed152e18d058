# syntax=docker/dockerfile:1.7
#
# cinflow, CPU only: the inference worker without a GPU, and the image for the
# one-shot commands (enqueue, enqueue-train, dead-letters, publish-model, verify).
# The binary is built without cargo features (no libtorch); ONNX Runtime is the
# CPU build from the PyPI wheel `onnxruntime`, loaded at run time (ort load-dynamic)
# from ORT_DYLIB_PATH.
#
# Build from the repository root (the context; deploy/cpu.Dockerfile.dockerignore
# keeps it to what cargo needs):
#   docker build -f deploy/cpu.Dockerfile -t cinflow-cpu:0.1.0 .

ARG RUST_VERSION=1.95
ARG ORT_VERSION=1.31.1

# ---- build: the cinflow binary (no features) --------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
# nasm: SIMD of the vendored libjpeg-turbo (mozjpeg-sys); cmake and clang: C code
# of aws-lc-sys (rustls-aws-lc) and friends.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nasm cmake clang \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Registry and target folder are BuildKit cache mounts: a rebuild after a source
# change recompiles cinflow only. The target folder is not part of the image, so
# the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,id=cinflow-target-default,sharing=locked \
    cargo build --release --locked --bin cinflow \
 && install -D -m 0755 target/release/cinflow /out/cinflow

# ---- ort: libonnxruntime.so from the PyPI wheel -----------------------------
# Python is only the unpacker here; the runtime image gets the two shared
# libraries and no Python.
FROM python:3.11-slim-bookworm AS ort
ARG ORT_VERSION
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install --disable-pip-version-check --no-deps "onnxruntime==${ORT_VERSION}" \
 && capi="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/onnxruntime/capi" \
 && mkdir -p /out/lib \
 && cp -a "$capi/libonnxruntime.so.${ORT_VERSION}" "$capi/libonnxruntime_providers_shared.so" /out/lib/ \
 && ln -s "libonnxruntime.so.${ORT_VERSION}" /out/lib/libonnxruntime.so

# ---- runtime ---------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
ARG ORT_VERSION
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="cinflow-cpu" \
      org.opencontainers.image.description="cinflow CPU image: CIN grading with ONNX Runtime (CPU) and Grad-CAM; inference worker and the enqueue, enqueue-train, dead-letters and publish-model commands" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
# ca-certificates: https S3 endpoints and amqps brokers are verified against the
# system roots (plus --s3-ca-file / --amqp-ca-file for a private CA).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cinflow \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cinflow --create-home \
      --shell /usr/sbin/nologin cinflow
COPY --from=ort /out/lib/ /opt/onnxruntime/lib/
COPY --from=build /out/cinflow /usr/local/bin/cinflow
ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so.${ORT_VERSION} \
    CINFLOW_METRICS_ADDR=0.0.0.0:8080 \
    HOME=/var/lib/cinflow
USER 10001:10001
# Writable by the cinflow user. The model cache stays at its default
# (/tmp/cinflow-models, CINFLOW_MODEL_CACHE); mount a writable /tmp when the root
# filesystem is read-only.
WORKDIR /var/lib/cinflow
# The worker's HTTP server: /metrics, /healthz, /readyz.
EXPOSE 8080
ENTRYPOINT ["cinflow"]
CMD ["worker", "infer"]

# Smoke test, last: the binary runs, `cinflow check-runtime` loads ONNX Runtime
# and sets up a CPU session configuration, and every library is resolved.
RUN cinflow --version \
 && cinflow check-runtime --device cpu \
 && test -f "$ORT_DYLIB_PATH" \
 && deps="$(ldd "$ORT_DYLIB_PATH")" \
 && if printf '%s\n' "$deps" | grep 'not found'; then echo "unresolved libraries of $ORT_DYLIB_PATH" >&2; exit 1; fi
