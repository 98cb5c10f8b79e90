# One entry point for developers and CI.
#   make sandbox   README command #1: the operator on embedded defaults, no cluster needed
#   make test      README command #2: installs the pinned test tools, runs every test
#   make lint      rustfmt and clippy, as CI runs them

TOOLS_BIN := $(CURDIR)/.ci/cache/bin
export PATH := $(TOOLS_BIN):$(PATH)

.PHONY: test tools lint crds sandbox bench

test: tools
	cargo test --workspace
	PYTHONDONTWRITEBYTECODE=1 .ci/cache/venv/bin/python -m pytest -p no:cacheprovider charts/stripe-key-operator/tests -q

tools:
	@bash .ci/install-tools.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

crds:
	cargo run --quiet -- crdgen > crds/stripekeys.io.yaml
	cp crds/stripekeys.io.yaml charts/stripe-key-operator/crds/stripekeys.io.yaml

sandbox:
	cargo run --quiet -- sandbox

bench:
	cargo bench
