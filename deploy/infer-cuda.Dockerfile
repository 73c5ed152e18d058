# syntax=docker/dockerfile:1.7
#
# cinflow inference worker on NVIDIA GPUs: ONNX Runtime's CUDA execution provider
# from the PyPI wheel onnxruntime-gpu[cuda,cudnn] (built for CUDA 13). The CUDA
# libraries (cuBLAS, cuDNN, cuFFT, cuRAND, NVRTC, the CUDA runtime) come from the
# nvidia-* wheels that the extras pull in, pinned in deploy/cuda-constraints.txt to
# the versions torch 2.13 uses; the host provides the driver (libcuda.so.1) through
# the NVIDIA Container Toolkit. The binary is the same featureless build as the CPU
# image (no libtorch).
#
# Build from the repository root:
#   docker build -f deploy/infer-cuda.Dockerfile -t cinflow-infer-cuda:0.1.0 .
# Run (driver >= 580, i.e. CUDA 13, and the NVIDIA Container Toolkit on the host):
#   docker run --gpus all ... cinflow-infer-cuda:0.1.0

ARG RUST_VERSION=1.95
ARG ORT_VERSION=1.31.1
# The `base` flavour (CUDA runtime only, no cuBLAS/cuDNN): every CUDA library the
# provider loads comes from the wheels, so the `runtime` flavour would only add a
# second, unused copy of cuBLAS & co. (about 2 GB).
ARG CUDA_BASE=nvidia/cuda:13.0.1-base-ubuntu24.04

# ---- build: the cinflow binary (no features; same stage as deploy/cpu.Dockerfile,
# so both share the target cache) --------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends nasm cmake clang \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,id=cinflow-target-default,sharing=locked \
    cargo build --release --locked --bin cinflow \
 && install -D -m 0755 target/release/cinflow /out/cinflow

# ---- ort: onnxruntime-gpu and its CUDA wheels --------------------------------
# Python only unpacks the wheels. What the runtime needs is copied out keeping the
# site-packages layout (onnxruntime/capi next to nvidia/*/lib); headers and static
# libraries are dropped.
FROM python:3.11-slim-bookworm AS ort
ARG ORT_VERSION
COPY deploy/cuda-constraints.txt /tmp/cuda-constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install --disable-pip-version-check \
      -c /tmp/cuda-constraints.txt "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}" \
 && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && mkdir -p /out/site-packages/onnxruntime/capi \
 && cp -a "$site/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION}" \
          "$site/onnxruntime/capi/libonnxruntime_providers_shared.so" \
          "$site/onnxruntime/capi/libonnxruntime_providers_cuda.so" \
          /out/site-packages/onnxruntime/capi/ \
 && ln -s "libonnxruntime.so.${ORT_VERSION}" /out/site-packages/onnxruntime/capi/libonnxruntime.so \
 && cp -a "$site/nvidia" /out/site-packages/ \
 && rm -rf /out/site-packages/nvidia/*/include \
 && find /out/site-packages/nvidia -name '*.a' -delete \
 && test -f /out/site-packages/nvidia/cu13/lib/libcudart.so.13 \
 && test -f /out/site-packages/nvidia/cudnn/lib/libcudnn.so.9

# ---- runtime ---------------------------------------------------------------
FROM ${CUDA_BASE} AS runtime
ARG ORT_VERSION
ARG CUDA_BASE
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="cinflow-infer-cuda" \
      org.opencontainers.image.description="cinflow inference worker on NVIDIA GPUs: CIN grading with ONNX Runtime (CUDA 13 execution provider) and Grad-CAM" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="docker.io/${CUDA_BASE}"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cinflow \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cinflow --create-home \
      --shell /usr/sbin/nologin cinflow
COPY --from=ort /out/site-packages/ /opt/cinflow/site-packages/
COPY --from=build /out/cinflow /usr/local/bin/cinflow
# The CUDA provider library has no rpath to the wheels' folders: the loader finds
# cuBLAS, cuRAND, the CUDA runtime (nvidia/cu13/lib) and cuDNN (nvidia/cudnn/lib)
# through LD_LIBRARY_PATH; /usr/local/nvidia/* is kept from the base image.
# CINFLOW_DEVICE=cuda: a GPU image that cannot reach its GPU fails at start-up with
# the reason instead of grading on the CPU at a fraction of the speed; set it to
# `auto` to allow the CPU fallback.
ENV ORT_DYLIB_PATH=/opt/cinflow/site-packages/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION} \
    LD_LIBRARY_PATH=/opt/cinflow/site-packages/nvidia/cu13/lib:/opt/cinflow/site-packages/nvidia/cudnn/lib:/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    CINFLOW_DEVICE=cuda \
    CINFLOW_METRICS_ADDR=0.0.0.0:8080 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/var/lib/cinflow
USER 10001:10001
WORKDIR /var/lib/cinflow
EXPOSE 8080
ENTRYPOINT ["cinflow"]
CMD ["worker", "infer"]

# Smoke test, last: the binary runs; `cinflow check-runtime` loads ONNX Runtime and
# finds the CUDA execution provider in it (there is no GPU at build time: on a
# node, `cinflow check-runtime --device cuda` opens the GPU); the CUDA provider
# and cuDNN have every library resolved except the driver's libcuda.so.1, which
# the NVIDIA Container Toolkit mounts at run time.
RUN cinflow --version \
 && cinflow check-runtime --device cpu | tee /dev/stderr | grep -q "CUDA execution provider: in this build" \
 && test -f "$ORT_DYLIB_PATH" \
 && for f in "$ORT_DYLIB_PATH" \
             /opt/cinflow/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so \
             /opt/cinflow/site-packages/nvidia/cudnn/lib/libcudnn.so.9; do \
      deps="$(ldd "$f")" || exit 1; \
      if printf '%s\n' "$deps" | grep 'not found' | grep -v 'libcuda\.so\.1'; then \
        echo "unresolved libraries of $f" >&2; exit 1; \
      fi; \
    done
