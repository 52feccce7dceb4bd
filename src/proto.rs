//! Types generated from `proto/` (see `build.rs`): Istio's CA API, and the
//! subset of Envoy's xDS/SDS API the agent serves.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// `istio.v1.auth`: the CA service.
pub mod istio {
    tonic::include_proto!("istio.v1.auth");
}

/// CreateCertificate response metadata: the generation of the trust bundle
/// in the answer's last `cert_chain` element. Our agents order bundles by
/// it; Istio's agents ignore it.
pub const BUNDLE_GENERATION_HEADER: &str = "x-workload-ca-bundle-generation";

/// CreateCertificate request metadata sent by our agents, which report the
/// leaves they hold over the bundle watch. A leaf is left out of the CA's
/// ledger (for the rotation gates) only when the request carries it and a
/// bundle watch is open on the same connection; a client that does that
/// falsely only hides its own leaf from the gates.
pub const AGENT_HEADER: &str = "x-workload-ca-agent";

/// The largest `AgentReport` the CA reads (and agents send): the leaves
/// of a node with 110 pods on RSA-4096 keys fit, about 170 KB.
pub const MAX_REPORT_BYTES: usize = 256 * 1024;

/// `workloadca.v1`: our own service beside Istio's (the bundle watch).
pub mod workloadca {
    tonic::include_proto!("workloadca.v1");
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
        pub mod secret {
            pub mod v3 {
                tonic::include_proto!("envoy.service.secret.v3");
            }
        }
    }
    pub mod extensions {
        pub mod transport_sockets {
            pub mod tls {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                }
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// tonic-prost's protobuf codec with 1 KiB initial buffers instead of
/// tonic's 8 KiB. Every call allocates its decode buffer when it starts
/// reading its body, so a call held open without one (up to the per-source
/// and total call limits) costs an eighth as much; a larger message grows
/// the buffer as usual (CSRs are 0.5 to 3 KB, Envoy's first SDS request
/// about 61 KB).
#[derive(Debug)]
pub struct SmallCodec<T, U>(std::marker::PhantomData<fn() -> (T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// Initial buffer size, and the size at which an encoder yields.
const CODEC_BUFFER_BYTES: usize = 1024;
const CODEC_YIELD_BYTES: usize = 32 * 1024;

impl<T, U> tonic::codec::Codec for SmallCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::new(
            CODEC_BUFFER_BYTES,
            CODEC_YIELD_BYTES,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(tonic::codec::BufferSettings::new(
            CODEC_BUFFER_BYTES,
            CODEC_YIELD_BYTES,
        ))
    }
}
