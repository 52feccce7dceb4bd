//! Every limit that keeps one client, authenticated or not, from exhausting
//! the CA server or the node agent: memory, file descriptors, accept
//! capacity. One place names them all, with their defaults; the command line
//! exposes each as a flag with an environment variable (`ca server --help`,
//! `ca agent --help`), and every refusal is counted under the `limit` label of
//! `workload_ca_limit_refusals_total` (server) or
//! `workload_ca_agent_limit_refusals_total` (agent).
//!
//! The defaults fit a large cluster: tens of thousands of pods, each keeping
//! one connection to the CA, several CA replicas, Istio agents and ztunnel
//! behind per-pod or per-node addresses.
//!
//! How each limit answers when crossed:
//!
//! | limit | answer |
//! |---|---|
//! | connections, per source, pending handshakes per source (places held in the admission pool, checked at accept) | the TCP connection is closed at once; a rate-limited log line |
//! | pending handshakes in all (the admission pool: handshakes, then until the first answer or the admission hold) | accepting pauses: new connections wait in the listen backlog (counted each time it pauses) |
//! | TLS handshake, HTTP/2 preface | the connection is closed at the deadline |
//! | idle connection, connection age | HTTP/2 `GOAWAY`, in-flight calls finish |
//! | streams per connection | advertised in `SETTINGS_MAX_CONCURRENT_STREAMS`; beyond it, `RST_STREAM(REFUSED_STREAM)` |
//! | header list size | advertised in `SETTINGS_MAX_HEADER_LIST_SIZE`; beyond it, HTTP 431 then `RST_STREAM(PROTOCOL_ERROR)` |
//! | streams reset for the client's errors, rapid resets | `GOAWAY(ENHANCE_YOUR_CALM)`, the connection closes |
//! | request deadline | gRPC `DEADLINE_EXCEEDED` (covers a missing or slow body) |
//! | answer not taken a second after the deadline (zero window) | the connection is closed |
//! | calls still open after `GOAWAY` plus the grace period | the connection is closed |
//! | calls in flight, per source and in all | gRPC `RESOURCE_EXHAUSTED` at once, before any handler runs |
//! | request message size | gRPC `OUT_OF_RANGE` before the message is buffered |
//! | SDS resource names per stream | gRPC `RESOURCE_EXHAUSTED`, that stream ends |
//! | peer warnings in the log | [`PEER_WARN_BURST`] per [`PEER_WARN_PERIOD`] per peer, the rest counted |
//!
//! Fixed limits, named where they are enforced: a CSR is at most
//! [`crate::ca::csr::MAX_CSR_BYTES`], a bearer token at most
//! [`crate::server::jwt::MAX_TOKEN_BYTES`] (both `InvalidArgument` /
//! `Unauthenticated` before any parsing).
//! | metrics port: header read, connection time, connections | the connection is closed |

use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};

/// Largest number of bytes of any peer-supplied value written to a log line
/// (a NACK's message, a token's issuer, a CSR's URI). See [`crate::logsafe`].
pub const MAX_LOGGED_PEER_BYTES: usize = 256;
/// Warnings one peer may cause before they are rate-limited.
pub const PEER_WARN_BURST: u32 = 10;
/// Once rate-limited, one more warning per this period (with a count of the
/// suppressed ones).
pub const PEER_WARN_PERIOD: Duration = Duration::from_secs(10);
/// Distinct peers whose warnings are tracked at once; past that the oldest
/// state is dropped (the table itself must not grow without bound).
pub const PEER_WARN_TABLE: usize = 4096;
/// The HTTP/2 connection preface every client sends first.
pub const HTTP2_PREFACE_LEN: u64 = 24;

/// Accepting connections: how many, from whom, and how long the handshake
/// may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptLimits {
    /// Open connections in all (handshaking ones included).
    pub max_connections: usize,
    /// Open connections from one source IP address. `None`: not checked
    /// (Unix sockets, where the socket itself is the boundary).
    pub max_connections_per_source: Option<usize>,
    /// Places in the admission pool: connections being admitted at once. A
    /// connection holds its place from accept through its TLS handshake
    /// and until its first call is answered, or [`Self::admission_hold`]
    /// after the handshake, whichever comes first. When the pool is full
    /// the accept loop stops accepting (connections wait in the kernel's
    /// listen backlog) until a place is freed: back-pressure, not a
    /// refusal. This is what bounds the memory of a burst of new
    /// connections: each one being admitted holds its TLS and HTTP/2
    /// buffers while its first call waits for the CPU.
    pub max_pending_handshakes: usize,
    /// Places in the admission pool one source address may hold at once
    /// (handshakes and post-handshake holds alike), so one source never
    /// takes the whole pool (while this is below the pool; `ca server`
    /// warns otherwise). Past it, a source's new connections wait for its
    /// turn (accepted, nothing read from them) rather than being refused:
    /// many clients behind one SNAT address are served in turn.
    pub max_pending_handshakes_per_source: usize,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How long after its handshake a connection keeps its place in the
    /// admission pool while its first call is not yet answered (a silent
    /// connection, or a long-lived stream that never ends, releases it
    /// then). Zero: the place is released when the handshake ends.
    pub admission_hold: Duration,
}

/// One HTTP/2 connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Http2Limits {
    /// Concurrent streams per connection (advertised and enforced).
    pub max_streams_per_connection: u32,
    /// Header list size per request, in bytes (advertised and enforced).
    pub max_header_list_bytes: u32,
    /// Time after the connection is accepted (and its TLS handshake done) by
    /// which the client must have sent the 24-byte HTTP/2 preface.
    pub preface_timeout: Duration,
    /// A connection with no call in flight for this long gets `GOAWAY`. (A
    /// proxy's SDS connection always has its streams open, so this only
    /// reclaims connections that hold none.)
    pub idle_timeout: Option<Duration>,
    /// Every connection gets `GOAWAY` at this age, so clients spread over
    /// replicas as they come and go.
    pub max_connection_age: Option<Duration>,
    /// After `GOAWAY` (idle, age, shutdown), how long calls in flight may
    /// take before the connection is closed regardless.
    pub goaway_grace: Duration,
    /// Deadline of every call, from its headers to its answer, covering a
    /// body that never comes (`DEADLINE_EXCEEDED`); shortened by the
    /// client's own `grpc-timeout`. A call still in flight a second after
    /// it (its answer not taken: a zero flow-control window) closes its
    /// connection. `None` for streaming services (SDS).
    pub request_timeout: Option<Duration>,
    /// Calls in flight from one source address, over all its connections
    /// (`None` where there is no address: Unix sockets). A call held open
    /// costs its stream and handler state; this is what bounds one client's
    /// share of memory, whatever it does with its connections.
    pub max_calls_per_source: Option<usize>,
    /// Calls in flight in all.
    pub max_calls: Option<usize>,
    /// Largest gRPC message decoded, in bytes.
    pub max_message_bytes: usize,
    /// Streams the server may reset because the client broke a rule (the
    /// stream cap, an oversized header list, a malformed frame) before the
    /// connection gets `GOAWAY(ENHANCE_YOUR_CALM)`.
    pub max_reset_streams: usize,
    /// Streams the client may open and reset before the server has even
    /// accepted them (HTTP/2 "rapid reset", CVE-2023-44487) before the
    /// connection gets `GOAWAY(ENHANCE_YOUR_CALM)`.
    pub max_pending_accept_resets: usize,
    /// Flow-control windows: how much a client may send ahead of what the
    /// handler has read. (tonic moves what arrives into the call's own
    /// buffer, which `max_message_bytes` bounds.)
    pub stream_window_bytes: u32,
    /// The connection-level window, shared by all of a connection's streams.
    pub connection_window_bytes: u32,
}

/// The operations endpoint (`/metrics`, `/healthz`, `/readyz`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpsLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// From one source address: one client cannot take every slot from the
    /// kubelet's probes and Prometheus.
    pub max_connections_per_source: usize,
    /// Time for a client to send a request's headers.
    pub header_read_timeout: Duration,
    /// Time a connection may stay open in all.
    pub connection_timeout: Duration,
}

impl Default for OpsLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_connections_per_source: 16,
            header_read_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
        }
    }
}

/// The CA server's gRPC port and its operations endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// The gRPC port's accept loop.
    pub accept: AcceptLimits,
    /// The gRPC port's HTTP/2 connections.
    pub http2: Http2Limits,
    /// The operations endpoint.
    pub ops: OpsLimits,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            accept: AcceptLimits {
                max_connections: 20_000,
                // A pod, a node agent or ztunnel needs a handful; raise it
                // where many clients reach the CA through one SNAT address.
                max_connections_per_source: Some(256),
                // The CPU is the bottleneck: a few hundred connections being
                // admitted keep 2 cores busy, and each one admitted holds
                // ~20-40 KB of TLS and HTTP/2 buffers while its call waits.
                max_pending_handshakes: 256,
                // A sixteenth of the pool: sixteen sources to fill it.
                max_pending_handshakes_per_source: 16,
                handshake_timeout: Duration::from_secs(5),
                admission_hold: Duration::from_secs(1),
            },
            http2: Http2Limits {
                max_streams_per_connection: 100,
                // A Kubernetes token is 1-2 KB; `MAX_TOKEN_BYTES` is 16 KiB.
                max_header_list_bytes: 32 * 1024,
                preface_timeout: Duration::from_secs(5),
                idle_timeout: Some(Duration::from_secs(10 * 60)),
                max_connection_age: Some(Duration::from_secs(30 * 60)),
                goaway_grace: Duration::from_secs(20),
                request_timeout: Some(Duration::from_secs(15)),
                // A call waiting for its body holds a buffer of the size it
                // declared (up to `max_message_bytes`): 256 x 66 KiB = 17 MiB
                // per source, 4,096 x 66 KiB = 270 MiB in all, at most.
                max_calls_per_source: Some(256),
                max_calls: Some(4_096),
                // A CSR is at most 64 KiB (`MAX_CSR_BYTES`), plus metadata.
                max_message_bytes: 66 * 1024,
                max_reset_streams: 1024,
                max_pending_accept_resets: 20,
                stream_window_bytes: 128 * 1024,
                connection_window_bytes: 512 * 1024,
            },
            ops: OpsLimits::default(),
        }
    }
}

/// The node agent's SDS sockets (each socket has its own) and its
/// operations endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentLimits {
    /// `max_connections` is per socket: one workload's socket cannot starve
    /// another's.
    pub accept: AcceptLimits,
    /// The SDS sockets' HTTP/2 connections.
    pub http2: Http2Limits,
    /// Distinct resource names one SDS stream may subscribe to. A proxy asks
    /// for two to four (`default`, `ROOTCA`, its SPIFFE ID, its trust domain).
    pub max_resource_names_per_stream: usize,
    /// The operations endpoint.
    pub ops: OpsLimits,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            accept: AcceptLimits {
                max_connections: 16,
                max_connections_per_source: None,
                max_pending_handshakes: 16,
                max_pending_handshakes_per_source: 16,
                handshake_timeout: Duration::from_secs(5),
                // The pool is as large as `max_connections`: a hold would
                // never make a connection wait here.
                admission_hold: Duration::ZERO,
            },
            http2: Http2Limits {
                // Envoy opens one stream per secret name.
                max_streams_per_connection: 32,
                max_header_list_bytes: 16 * 1024,
                preface_timeout: Duration::from_secs(5),
                // A connection without a single stream: never Envoy's.
                idle_timeout: Some(Duration::from_secs(5 * 60)),
                max_connection_age: None,
                goaway_grace: Duration::from_secs(2),
                request_timeout: None,
                max_calls_per_source: None,
                // Streams per socket (each socket has its own count): a
                // proxy opens one per secret name. A stream waiting for a
                // message holds a buffer of the size it declared, so this
                // times `max_message_bytes` bounds a socket: 16 MiB.
                max_calls: Some(64),
                // Envoy's first request carries its whole node (~61 KB with
                // extensions).
                max_message_bytes: 256 * 1024,
                max_reset_streams: 1024,
                max_pending_accept_resets: 20,
                stream_window_bytes: 1024 * 1024,
                connection_window_bytes: 2 * 1024 * 1024,
            },
            max_resource_names_per_stream: 16,
            ops: OpsLimits::default(),
        }
    }
}

/// The `limit` label values of the refusal counter.
pub mod label {
    /// A connection refused: `max_connections` open already.
    pub const CONNECTIONS: &str = "connections";
    /// A connection refused: its source has `max_connections_per_source` open.
    pub const CONNECTIONS_PER_SOURCE: &str = "connections_per_source";
    /// A connection refused: `max_pending_handshakes` under way already.
    pub const PENDING_HANDSHAKES: &str = "pending_handshakes";
    /// A connection refused: its source has `max_pending_handshakes_per_source` under way.
    pub const PENDING_HANDSHAKES_PER_SOURCE: &str = "pending_handshakes_per_source";
    /// A TLS handshake not done within `handshake_timeout`.
    pub const HANDSHAKE_TIMEOUT: &str = "handshake_timeout";
    /// No HTTP/2 preface within `preface_timeout`.
    pub const PREFACE_TIMEOUT: &str = "preface_timeout";
    /// A connection closed after `idle_timeout` without a stream.
    pub const IDLE_TIMEOUT: &str = "idle_timeout";
    /// A stream refused: `max_streams_per_connection` open on its connection.
    pub const STREAMS_PER_CONNECTION: &str = "streams_per_connection";
    /// Request headers over `max_header_list_bytes`.
    pub const HEADER_LIST_SIZE: &str = "header_list_size";
    /// A connection closed for resetting too many streams (rapid reset).
    pub const RESET_FLOOD: &str = "http2_reset_flood";
    /// A call cancelled after `request_timeout`.
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// A connection closed because a call's answer was not taken in time.
    pub const RESPONSE_STALLED: &str = "response_stalled";
    /// A call refused: its source has `max_calls_per_source` open.
    pub const CALLS_PER_SOURCE: &str = "calls_per_source";
    /// A call refused: `max_calls` open already.
    pub const CALLS: &str = "calls";
    /// A message over `max_message_bytes`.
    pub const MESSAGE_SIZE: &str = "message_size";
    /// An SDS stream subscribing to more than `max_resource_names_per_stream`.
    pub const RESOURCE_NAMES: &str = "resource_names_per_stream";
    /// An operations connection refused: over its connection limits.
    pub const OPS_CONNECTIONS: &str = "ops_connections";
    /// An operations connection closed at its `connection_timeout`.
    pub const OPS_TIMEOUT: &str = "ops_timeout";
    /// A bundle watch refused: one open already on its connection.
    pub const WATCHES_PER_CONNECTION: &str = "watches_per_connection";
    /// A bundle watch refused: the total of open watches is reached.
    pub const WATCHES: &str = "watches";
    /// An SDS connection from a process other than the socket's bound peer.
    pub const PEER_CREDENTIALS: &str = "peer_credentials";

    /// Every label, for registering each from the start.
    pub const ALL: &[&str] = &[
        CONNECTIONS,
        CONNECTIONS_PER_SOURCE,
        PENDING_HANDSHAKES,
        PENDING_HANDSHAKES_PER_SOURCE,
        HANDSHAKE_TIMEOUT,
        PREFACE_TIMEOUT,
        IDLE_TIMEOUT,
        STREAMS_PER_CONNECTION,
        HEADER_LIST_SIZE,
        RESET_FLOOD,
        REQUEST_TIMEOUT,
        RESPONSE_STALLED,
        CALLS_PER_SOURCE,
        CALLS,
        MESSAGE_SIZE,
        RESOURCE_NAMES,
        OPS_CONNECTIONS,
        OPS_TIMEOUT,
        WATCHES_PER_CONNECTION,
        WATCHES,
        PEER_CREDENTIALS,
    ];
}

/// Refusals by limit, and peer warnings suppressed by the log rate limit.
#[derive(Clone)]
pub struct Refusals {
    refusals: IntCounterVec,
    suppressed: prometheus::IntCounter,
}

impl Refusals {
    /// Registers `<prefix>_limit_refusals_total{limit}` and
    /// `<prefix>_log_suppressed_total` in `registry`, every label present
    /// from the start (so a dashboard sees zeros, not gaps).
    ///
    /// # Errors
    /// A registration error (a programming error: a name used twice).
    pub fn register(registry: &Registry, prefix: &str) -> Result<Self, prometheus::Error> {
        let refusals = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_limit_refusals_total"),
                "Connections, streams or requests refused because they crossed a limit (see the `limit` label).",
            ),
            &["limit"],
        )?;
        registry.register(Box::new(refusals.clone()))?;
        for l in label::ALL {
            refusals.with_label_values(&[l]);
        }
        let suppressed = prometheus::IntCounter::new(
            format!("{prefix}_log_suppressed_total"),
            "Warnings caused by a peer that were not logged because that peer exceeded the log rate limit.",
        )?;
        registry.register(Box::new(suppressed.clone()))?;
        Ok(Self {
            refusals,
            suppressed,
        })
    }

    /// Counts one refusal by `limit` (a [`label`] value).
    pub fn refused(&self, limit: &str) {
        self.refusals.with_label_values(&[limit]).inc();
    }

    /// The refusals counted so far for `limit`.
    pub fn get(&self, limit: &str) -> u64 {
        self.refusals.with_label_values(&[limit]).get()
    }

    /// Counts `n` peer warnings the log rate limit suppressed.
    pub fn suppressed(&self, n: u64) {
        self.suppressed.inc_by(n);
    }
}
