# syntax=docker/dockerfile:1.7
#
# The stripe-key-operator image: a release build of the operator's binary (and of the egress
# broker sidecar's), on distroless (glibc, CA certificates, no shell, no package manager),
# running as the non-root UID 65532.
#
#   docker build -t stripe-key-operator:dev .
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) \
#     --build-arg CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ) -t stripe-key-operator:0.1.0 .

ARG RUST_VERSION=1.95

# --- build ------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
# aws-lc-sys (the rustls crypto provider) compiles C; cmake covers the targets where its
# cc-based build falls back to CMake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cargo.lock is committed: --locked builds exactly the audited dependency versions.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin stripe-key-operator --bin stripe-egress-proxy \
 && install -D -m 0755 target/release/stripe-key-operator /out/stripe-key-operator \
 && install -D -m 0755 target/release/stripe-egress-proxy /out/stripe-egress-proxy

# --- runtime ----------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="stripe-key-operator" \
      org.opencontainers.image.description="Kubernetes operator that mints, stores, injects and rotates least-privilege Stripe keys and webhook secrets" \
      org.opencontainers.image.source="https://github.com/stripe-key-operator/stripe-key-operator" \
      org.opencontainers.image.url="https://github.com/stripe-key-operator/stripe-key-operator" \
      org.opencontainers.image.documentation="https://github.com/stripe-key-operator/stripe-key-operator/tree/main/charts/stripe-key-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
# Owned by root and not writable by the process.
COPY --from=build /out/stripe-key-operator /stripe-key-operator
# The egress broker sidecar alone (brokered workloads: command ["/stripe-egress-proxy"]); the
# same broker as `stripe-key-operator egress-proxy`, with half the RSS.
COPY --from=build /out/stripe-egress-proxy /stripe-egress-proxy
# One glibc malloc arena: each thread that allocates otherwise gets its own, and what they keep
# after a burst was most of the operator's memory. Allocations of 128 KiB and more (list pages,
# grown hash tables) always get their own mapping, returned when freed: glibc otherwise raises
# that threshold after such a free and serves the next ones from the heap, which keeps the
# pages (README, "Where the memory goes").
ENV MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=131072
USER 65532:65532
# /metrics, /healthz, /readyz
EXPOSE 8080
ENTRYPOINT ["/stripe-key-operator"]
CMD ["run"]
