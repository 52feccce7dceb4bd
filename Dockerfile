# workload-ca: the `ca` binary (server, agent, rotate-root) in a distroless
# image: no shell, no package manager, non-root.
#
#   docker build -t workload-ca:dev .
#
# The build needs no protoc (build.rs compiles the protos with protox).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin ca \
 && install -D -m 0755 target/release/ca /out/ca

# glibc and libgcc, nothing else; uid/gid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ca /ca
USER 65532:65532
# The server's state (embedded root, admin socket) goes to --state-dir:
# mount a writable volume there (deploy/ uses an emptyDir).
WORKDIR /var/lib/workload-ca
EXPOSE 15012 15014
ENTRYPOINT ["/ca"]
CMD ["server", "--listen", "0.0.0.0:15012", "--ops-listen", "0.0.0.0:15014", "--state-dir", "/var/lib/workload-ca"]
