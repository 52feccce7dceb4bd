# Build: docker build -t workload-ca .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin ca

FROM debian:bookworm-slim
COPY --from=build /src/target/release/ca /usr/local/bin/ca
# Non-root; the state directory must be writable by this user.
USER 65532:65532
WORKDIR /var/lib/workload-ca
ENTRYPOINT ["/usr/local/bin/ca"]
CMD ["server", "--listen", "0.0.0.0:15012", "--ops-listen", "0.0.0.0:15014", "--state-dir", "/var/lib/workload-ca"]
