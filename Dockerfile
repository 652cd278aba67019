# booking-worker container image.
#
#   docker build -t booking-worker .
#   docker run --rm --stop-timeout 45 -p 9090:9090 \
#       -e KAFKA_BROKERS=kafka:9092 -e DB_HOST=postgres -e DB_PASSWORD=... booking-worker
#
# Stages:
#   toolchain  Rust plus exactly the system packages CI builds with
#              (scripts/install-deps.sh --build-only); also the Okteto dev image.
#   build      compiles the worker with the command scripts/run.sh uses.
#   prebuilt   instead of compiling: target/release/booking-worker from the
#              build context (a binary built on a bookworm host), at the path
#              where the build stage leaves its own.
#   binary     the stage the binary comes from, chosen by BINARY_FROM: build
#              (the default) or prebuilt. The tests build the image with
#              `--build-arg BINARY_FROM=prebuilt` (scripts/container-image.sh);
#              the runtime stage is the same either way.
#   runtime    debian:bookworm-slim with the shared libraries the binary links
#              (libssl3, zlib1g) and CA certificates; runs as uid 10001.
#
# Kafka TLS and SASL (PLAIN, SCRAM-SHA-256/512, OAUTHBEARER) are compiled in
# through the system OpenSSL: KAFKA_PROP_SECURITY_PROTOCOL=sasl_ssl and friends.
# Kerberos (GSSAPI) is not. TLS to PostgreSQL goes through the same OpenSSL
# (DB_SSLMODE, DB_SSLROOTCERT).
#
# Stopping: the worker drains on SIGTERM within SHUTDOWN_TIMEOUT_SECS (30 s by
# default). Docker's own grace period is 10 s, so give it more: `docker run
# --stop-timeout 45`, compose `stop_grace_period: 45s`, Kubernetes
# `terminationGracePeriodSeconds: 45`. Replay is idempotent, so a kill is safe,
# only slower to recover from.

# Where the runtime stage takes the binary from: build or prebuilt (see above).
ARG BINARY_FROM=build

# ---- toolchain ---------------------------------------------------------------
# Rust 1.95 is the oldest toolchain Cargo.lock builds with (parking_lot 0.13 and
# lock_api 0.5, through scheduled-thread-pool, declare rust-version 1.95).
FROM rust:1.95.0-bookworm AS toolchain
WORKDIR /usr/src/booking-worker
COPY scripts/lib.sh scripts/install-deps.sh scripts/
RUN bash scripts/install-deps.sh --build-only

# ---- build -------------------------------------------------------------------
FROM toolchain AS build
# Dependencies first: this layer is rebuilt only when Cargo.toml or Cargo.lock
# change. cargo refuses a manifest without a target, so the fetch gets empty
# stand-ins for src/main.rs and src/lib.rs, removed right after.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && printf 'fn main() {}\n' > src/main.rs \
    && touch src/lib.rs \
    && cargo fetch --locked \
    && rm -rf src
COPY src/ src/
COPY sql/ sql/
# The same command as scripts/run.sh (tests/packaging.sh compares them). The
# release profile keeps line tables (debug = "line-tables-only") and nothing
# strips the binary, so thread dumps (gdb, eu-stack) show file:line.
RUN cargo build --release --locked --bin booking-worker

# ---- prebuilt ----------------------------------------------------------------
# Only built with --build-arg BINARY_FROM=prebuilt: .dockerignore lets exactly
# this file of target/ into the context.
FROM scratch AS prebuilt
COPY target/release/booking-worker /usr/src/booking-worker/target/release/booking-worker

# ---- binary ------------------------------------------------------------------
FROM ${BINARY_FROM} AS binary

# ---- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
LABEL org.opencontainers.image.title="booking-worker" \
      org.opencontainers.image.description="Consumes hotel booking and cancellation events from Apache Kafka into PostgreSQL." \
      org.opencontainers.image.licenses="MIT"
# Unpinned on purpose: bookworm's archive keeps only the newest build of each
# package, so a pinned version stops resolving at the next security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 booking-worker \
    && useradd --system --uid 10001 --gid booking-worker --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin booking-worker
COPY --from=binary /usr/src/booking-worker/target/release/booking-worker /usr/local/bin/booking-worker

# Every setting is an environment variable (README, "Configuration"); none is
# baked in but the metrics address, which the HEALTHCHECK below relies on
# (METRICS_ADDR=off would make it fail). Pass DB_PASSWORD at run time.
ENV METRICS_ADDR=0.0.0.0:9090
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 9090
STOPSIGNAL SIGTERM
# GET /healthz on METRICS_ADDR: 200 -> exit 0, else 1. The start period covers
# a database that is still coming up (the worker waits for it with backoff).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["booking-worker", "healthcheck"]
ENTRYPOINT ["booking-worker"]
CMD ["run"]
