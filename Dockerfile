# syntax=docker/dockerfile:1
# Spillway's images, one build for all three binaries:
#   docker build --target producer -t spillway-producer:dev .
#   docker build --target worker   -t spillway-worker:dev .
#   docker build --target scaler   -t spillway-scaler:dev .
# (./manage.sh up builds them into the cluster's runtime.)

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
# Dependencies first, in a layer of their own: it is rebuilt only when a manifest or
# the lock file changes, not on every source edit.
COPY Cargo.toml Cargo.lock ./
COPY vendor vendor
COPY common/Cargo.toml common/
COPY ledger/Cargo.toml ledger/
COPY producer/Cargo.toml producer/
COPY worker/Cargo.toml worker/
COPY scaling/Cargo.toml scaling/
COPY scaler/Cargo.toml scaler/
COPY testkit/Cargo.toml testkit/
# Placeholder sources for every target the manifests declare (binaries, benches), so
# cargo can build the dependencies alone.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN for crate in common ledger producer worker scaling scaler testkit; do \
        mkdir -p "$crate/src" "$crate/benches" \
        && echo 'fn main() {}' > "$crate/src/main.rs" && touch "$crate/src/lib.rs" \
        && sed -n '/^\[\[bench\]\]/,/^name/s/^name = "\(.*\)"/\1/p' "$crate/Cargo.toml" \
            | while read -r bench; do echo 'fn main() {}' > "$crate/benches/$bench.rs"; done; \
    done \
    && cargo build --release --locked --bins \
    && rm -rf common ledger producer worker scaling scaler testkit
COPY common common
COPY ledger ledger
COPY producer producer
COPY worker worker
COPY scaling scaling
COPY scaler scaler
COPY testkit testkit
# Touch the sources so cargo rebuilds them over the placeholder builds above.
RUN find common ledger producer worker scaling scaler testkit -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bins

# The run-time base: no compiler, no build tools; a shell for the exec handler.
FROM debian:bookworm-slim AS runtime
RUN groupadd --gid 10001 spillway \
    && useradd --uid 10001 --gid spillway --no-create-home --shell /usr/sbin/nologin spillway
USER 10001:10001
ENV LOG_FORMAT=json

FROM runtime AS producer
COPY --from=builder /src/target/release/producer /usr/local/bin/producer
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/producer"]

FROM runtime AS worker
COPY --from=builder /src/target/release/worker /usr/local/bin/worker
ENTRYPOINT ["/usr/local/bin/worker"]

FROM runtime AS scaler
COPY --from=builder /src/target/release/scaler /usr/local/bin/scaler
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/scaler"]
