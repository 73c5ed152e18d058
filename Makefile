# The two commands of README.md:
#   make demo   the embedded default: synthetic slides graded with heatmaps in ./demo-out
#   make test   everything CI runs (.ci/run calls it)
#   make fuzz   coverage-guided fuzzing, FUZZ_SECONDS per target (docs/fuzzing.md)
# Heavy things live in a cache outside the clone ($(CINFLOW_CACHE)): the Python
# virtual environment (keyed by tools/requirements.txt) and the cargo target folder.
CINFLOW_CACHE ?= $(HOME)/.cache/cinflow
export CINFLOW_CACHE
export CARGO_TARGET_DIR ?= $(CINFLOW_CACHE)/target
CARGO_FLAGS := --release --locked --all-features
# Seconds per fuzz target: `make fuzz`, and the bounded run at the end of `make test`.
FUZZ_SECONDS ?= 600
CI_FUZZ_SECONDS ?= 20
# tch's build script (LIBTORCH_USE_PYTORCH=1, see .cargo/config.toml) asks the
# active Python where libtorch is: make the project's venv the active one.
export VIRTUAL_ENV := $(CURDIR)/.venv
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup build install demo test fuzz bench lint clean-demo s3-start s3-stop

setup:
	bash scripts/setup.sh

build: setup
	cargo build $(CARGO_FLAGS)

# `cinflow` on the PATH: the release binary copied to $(PREFIX)/bin. It finds
# the venv's ONNX Runtime (and, for training, libtorch) on its own.
PREFIX ?= $(HOME)/.local
install: build
	install -D -m 0755 $(CARGO_TARGET_DIR)/release/cinflow $(PREFIX)/bin/cinflow
	@echo "installed $(PREFIX)/bin/cinflow"

demo: build
	cargo run $(CARGO_FLAGS) --quiet -- demo --out demo-out

# The tests use the RabbitMQ on 127.0.0.1:5672 and a Garage S3 server that
# scripts/garage.sh builds once (cached) and starts on loopback.
test: setup
	bash scripts/rabbitmq.sh
	eval "$$(bash scripts/garage.sh start)" && cargo test $(CARGO_FLAGS)
	.venv/bin/python tools/test_export_backbone.py
	bash scripts/fuzz.sh $(CI_FUZZ_SECONDS)

# Longer fuzzing; the corpus in $(CINFLOW_CACHE)/fuzz grows from run to run.
fuzz:
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

bench: setup
	cargo bench --all-features
	bash scripts/bench-preprocess.sh
	bash scripts/bench-retrain.sh

lint: setup
	cargo fmt --check
	cargo clippy --all-targets --all-features -- -D warnings

clean-demo:
	rm -rf demo-out

s3-start:
	bash scripts/garage.sh start

s3-stop:
	bash scripts/garage.sh stop
