//! Generates the gRPC types from `proto/` with protox, a pure-Rust protobuf
//! compiler, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "istio/v1/auth/ca.proto",
            "workloadca/v1/bundle.proto",
            "envoy/service/secret/v3/sds.proto",
            "envoy/extensions/transport_sockets/tls/v3/secret.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        // tonic-prost's codec with small initial buffers (src/proto.rs).
        .codec_path("crate::proto::SmallCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
