# Multi-stage build of the paystream binary. Not built on the project's machines (no Docker
# engine there); the build step is the same `cargo build --release` the scripts use.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin paystream

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 paystream
COPY --from=build /src/target/release/paystream /usr/local/bin/paystream
USER paystream
CMD ["paystream", "up"]
