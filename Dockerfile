# syntax=docker/dockerfile:1
#
# canaryd container image.
#
#   docker build -t canaryd:0.1.0 .                                   # distroless (default)
#   docker build -t canaryd:0.1.0-debian --target runtime-debian .    # debian-slim, has a shell
#
#   docker run --rm --network host canaryd:0.1.0 demo                # the demo, on the host's loopback
#   docker run --rm -p 8080:8080 -p 9901:9901 -v "$PWD/conf:/etc/canaryd:ro" canaryd:0.1.0
#       # conf/canaryd.toml must bind 0.0.0.0 (not 127.0.0.1) to be reachable through -p; a
#       # non-loopback [admin] addr needs token_file (conf/ can hold it). Mount the directory,
#       # not the file: a single-file bind mount keeps the old inode when an editor renames.
#
# The runtime image holds the binary and nothing else it needs: the config is mounted at
# /etc/canaryd (CANARYD_CONFIG points at /etc/canaryd/canaryd.toml) and the optional state
# file goes to /var/lib/canaryd, owned by the non-root user 65532. No shell is needed at run
# time; probes are HTTP (/healthz, /readyz on the admin port), so there is no HEALTHCHECK.

ARG RUST_VERSION=1.95
# The builder's glibc must not be newer than the runtime's: distroless cc-debian12 is bookworm.
ARG DEBIAN_RELEASE=bookworm

# ---- builder: the release binary ---------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# Symbols are not needed in the image (panics still print their message).
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin canaryd \
    && install -D -m 0755 target/release/canaryd /out/usr/local/bin/canaryd \
    && install -d -m 0750 /out/var/lib/canaryd \
    && install -d -m 0755 /out/etc/canaryd

# ---- runtime-debian: debian-slim, for clusters that need `sleep` in a preStop hook --------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime-debian
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 65532 canaryd \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin canaryd
COPY --from=builder /out/usr/local/bin/canaryd /usr/local/bin/canaryd
COPY --from=builder --chown=65532:65532 /out/var/lib/canaryd /var/lib/canaryd
COPY --from=builder /out/etc/canaryd /etc/canaryd
ENV CANARYD_CONFIG=/etc/canaryd/canaryd.toml
USER 65532:65532
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/canaryd"]
CMD ["run"]

# ---- runtime (default): distroless cc = glibc + libgcc_s + CA certificates, no shell -------
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="canaryd" \
      org.opencontainers.image.description="L7 reverse proxy that splits traffic between a stable and canary upstreams" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/usr/local/bin/canaryd /usr/local/bin/canaryd
COPY --from=builder --chown=65532:65532 /out/var/lib/canaryd /var/lib/canaryd
COPY --from=builder /out/etc/canaryd /etc/canaryd
ENV CANARYD_CONFIG=/etc/canaryd/canaryd.toml
USER 65532:65532
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/canaryd"]
CMD ["run"]
