# syntax=docker/dockerfile:1.7
#
# cinflow training worker (`cinflow worker train`, and `cinflow train`): the binary
# built with the `train` feature, linked against libtorch from the PyPI wheel
# torch==2.13.0 (tch 0.26, LIBTORCH_USE_PYTORCH), plus ONNX Runtime GPU, because
# training extracts features through the bundle's ONNX backbone with the serving
# code. The PyPI torch wheel for Linux is the CUDA 13 build; its nvidia-* wheels
# also serve the ONNX Runtime CUDA provider (one copy of each library, pinned in
# deploy/cuda-constraints.txt). The image runs on CPU-only nodes too: devices
# default to `auto` (CINFLOW_TRAIN_DEVICE for the head, CINFLOW_DEVICE for the
# backbone).
#
# Build from the repository root (downloads about 3 GB of wheels the first time;
# BuildKit keeps them in a cache mount):
#   docker build -f deploy/train.Dockerfile -t cinflow-train:0.1.0 .

ARG RUST_VERSION=1.95
ARG ORT_VERSION=1.31.1
ARG CUDA_BASE=nvidia/cuda:13.0.1-base-ubuntu24.04

# ---- pyenv: build tools and a Python venv with torch and onnxruntime-gpu --------
# torch stays pinned to 2.13.0, the libtorch that tch 0.26 is built against (as in
# tools/requirements.txt). The venv is a layer of its own that depends only on the
# pins, so source changes never reinstall it. It is made with Debian's python3
# (3.11), so it also runs in the build stage below, where torch-sys asks it where
# libtorch is.
FROM rust:${RUST_VERSION}-bookworm AS pyenv
ARG ORT_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends nasm cmake clang python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY deploy/cuda-constraints.txt /tmp/cuda-constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --disable-pip-version-check --upgrade pip \
 && /opt/venv/bin/pip install --disable-pip-version-check -c /tmp/cuda-constraints.txt \
      "torch==2.13.0" "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}" \
 && site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && mkdir -p /opt/venv/cinflow-lib \
 && ln -sfn "$site/torch/lib" /opt/venv/cinflow-lib/torch \
 && ln -sfn "$site/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION}" /opt/venv/cinflow-lib/libonnxruntime.so
# The venv's python3 first on PATH: torch-sys runs `python3` (LIBTORCH_USE_PYTORCH=1
# comes from .cargo/config.toml) to find libtorch inside the torch wheel.
ENV PATH=/opt/venv/bin:${PATH}

# ---- build: cinflow with the train feature -----------------------------------
FROM pyenv AS build
WORKDIR /src
COPY . .
# .venv is where .cargo/config.toml and build.rs look (scripts/setup.sh makes the
# same link on a development machine).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,id=cinflow-target-train,sharing=locked \
    ln -sfn /opt/venv .venv \
 && cargo build --release --locked --features train --bin cinflow \
 && install -D -m 0755 target/release/cinflow /out/cinflow

# ---- libs: the shared libraries the worker loads, in the wheels' layout --------
# torch/lib finds the nvidia-* libraries through its rpath ($ORIGIN/../../nvidia/
# <name>/lib), so torch/lib and nvidia/ stay siblings. Headers, static libraries
# and Python code are left behind.
FROM pyenv AS libs
ARG ORT_VERSION
RUN site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && mkdir -p /out/site-packages/torch /out/site-packages/onnxruntime/capi \
 && cp -a "$site/torch/lib" /out/site-packages/torch/ \
 && cp -a "$site/nvidia" /out/site-packages/ \
 && cp -a "$site/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION}" \
          "$site/onnxruntime/capi/libonnxruntime_providers_shared.so" \
          "$site/onnxruntime/capi/libonnxruntime_providers_cuda.so" \
          /out/site-packages/onnxruntime/capi/ \
 && ln -s "libonnxruntime.so.${ORT_VERSION}" /out/site-packages/onnxruntime/capi/libonnxruntime.so \
 && rm -rf /out/site-packages/nvidia/*/include \
 && find /out/site-packages/nvidia -name '*.a' -delete \
 && test -f /out/site-packages/torch/lib/libtorch_cuda.so \
 && test -f /out/site-packages/nvidia/cudnn/lib/libcudnn.so.9

# ---- runtime ---------------------------------------------------------------
FROM ${CUDA_BASE} AS runtime
ARG ORT_VERSION
ARG CUDA_BASE
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="cinflow-train" \
      org.opencontainers.image.description="cinflow training worker: retrains the CIN classifier head with libtorch 2.13.0 (CUDA 13 or CPU) on features from the ONNX backbone, evaluates it and promotes it in the S3 model registry" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="docker.io/${CUDA_BASE}"
# libgomp1: the binary links GNU OpenMP next to libtorch (torch/lib also ships a
# copy, found first).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cinflow \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cinflow --create-home \
      --shell /usr/sbin/nologin cinflow
COPY --from=libs /out/site-packages/ /opt/cinflow/site-packages/
COPY --from=build /out/cinflow /usr/local/bin/cinflow
# libtorch (torch/lib) through LD_LIBRARY_PATH (the binary's build-time rpath points
# into the build stage); the nvidia-* folders for the ONNX Runtime CUDA provider,
# which has no rpath of its own; /usr/local/nvidia/* is kept from the base image.
ENV ORT_DYLIB_PATH=/opt/cinflow/site-packages/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION} \
    LD_LIBRARY_PATH=/opt/cinflow/site-packages/torch/lib:/opt/cinflow/site-packages/nvidia/cu13/lib:/opt/cinflow/site-packages/nvidia/cudnn/lib:/opt/cinflow/site-packages/nvidia/cusparselt/lib:/opt/cinflow/site-packages/nvidia/nccl/lib:/opt/cinflow/site-packages/nvidia/nvshmem/lib:/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    CINFLOW_METRICS_ADDR=0.0.0.0:8080 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/var/lib/cinflow
USER 10001:10001
# The worker stages each job's labels and images in a temporary folder (/tmp) and
# writes the new bundle there before uploading it.
WORKDIR /var/lib/cinflow
EXPOSE 8080
ENTRYPOINT ["cinflow"]
CMD ["worker", "train"]

# Smoke test, last: the binary starts (the loader resolves libtorch, libtorch_cuda
# and their CUDA libraries, or it would not), it has the train feature,
# `cinflow check-runtime` loads ONNX Runtime and finds its CUDA provider, which is there with every library resolved except the
# driver's libcuda.so.1 (mounted by the NVIDIA Container Toolkit at run time).
RUN cinflow --version \
 && cinflow check-runtime --device cpu | tee /dev/stderr | grep -q "CUDA execution provider: in this build" \
 && cinflow worker train --help > /dev/null \
 && test -f "$ORT_DYLIB_PATH" \
 && for f in /usr/local/bin/cinflow \
             "$ORT_DYLIB_PATH" \
             /opt/cinflow/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so \
             /opt/cinflow/site-packages/nvidia/cudnn/lib/libcudnn.so.9; do \
      deps="$(ldd "$f")" || exit 1; \
      if printf '%s\n' "$deps" | grep 'not found' | grep -v 'libcuda\.so\.1'; then \
        echo "unresolved libraries of $f" >&2; exit 1; \
      fi; \
    done
