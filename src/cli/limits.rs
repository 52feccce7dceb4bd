//! The flags of [`crate::limits`]: one per limit, each with an environment
//! variable, defaults taken from the limits' own `Default`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

use crate::limits::{AgentLimits, OpsLimits, ServerLimits};

/// A duration on the command line: `30s`, `15m`, `24h`, `250ms`; shown the
/// same way in `--help`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let s = self.0.as_secs();
        for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
            if s > 0 && s.is_multiple_of(n) {
                return write!(f, "{}{unit}", s / n);
            }
        }
        write!(f, "{s}s")
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        super::parse_duration(s).map(Dur)
    }
}

/// `0` (or `off`) turns an optional timeout off.
fn optional(d: Dur) -> Option<Duration> {
    (!d.0.is_zero()).then_some(d.0)
}

fn positive(name: &str, n: usize) -> anyhow::Result<usize> {
    if n == 0 {
        anyhow::bail!("--{name} must be at least 1");
    }
    Ok(n)
}

fn positive_u32(name: &str, n: u32) -> anyhow::Result<u32> {
    if n == 0 {
        anyhow::bail!("--{name} must be at least 1");
    }
    Ok(n)
}

fn nonzero(name: &str, d: Dur) -> anyhow::Result<Duration> {
    if d.0.is_zero() {
        anyhow::bail!("--{name} must be longer than zero");
    }
    Ok(d.0)
}

fn server_default() -> ServerLimits {
    ServerLimits::default()
}

fn agent_default() -> AgentLimits {
    AgentLimits::default()
}

/// The CA server's gRPC port limits.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Limits (gRPC port)")]
pub struct ServerLimitArgs {
    /// Open connections in all.
    #[arg(long, env = "CA_MAX_CONNECTIONS", default_value_t = server_default().accept.max_connections)]
    pub max_connections: usize,
    /// Open connections from one source IP address.
    #[arg(long, env = "CA_MAX_CONNECTIONS_PER_SOURCE", default_value_t = server_default().accept.max_connections_per_source.unwrap_or(usize::MAX))]
    pub max_connections_per_source: usize,
    /// Connections being admitted at once (TLS handshake, then until the first answer or --admission-hold); past it, new connections wait in the listen backlog.
    #[arg(long, env = "CA_MAX_PENDING_HANDSHAKES", default_value_t = server_default().accept.max_pending_handshakes)]
    pub max_pending_handshakes: usize,
    /// Places in the admission pool one source address may hold; past it, its new connections wait their turn (keep it below --max-pending-handshakes, so one source cannot take the pool).
    #[arg(long, env = "CA_MAX_PENDING_HANDSHAKES_PER_SOURCE", default_value_t = server_default().accept.max_pending_handshakes_per_source)]
    pub max_pending_handshakes_per_source: usize,
    /// How long after its handshake a connection may stay in admission while its first call is not answered (0: admission ends with the handshake).
    #[arg(long, env = "CA_ADMISSION_HOLD", default_value_t = Dur(server_default().accept.admission_hold))]
    pub admission_hold: Dur,
    /// Time allowed for a TLS handshake.
    #[arg(long, env = "CA_HANDSHAKE_TIMEOUT", default_value_t = Dur(server_default().accept.handshake_timeout))]
    pub handshake_timeout: Dur,
    /// Time after the handshake by which the HTTP/2 preface must arrive.
    #[arg(long, env = "CA_PREFACE_TIMEOUT", default_value_t = Dur(server_default().http2.preface_timeout))]
    pub preface_timeout: Dur,
    /// A connection with no call in flight this long gets GOAWAY (0: never).
    #[arg(long, env = "CA_IDLE_TIMEOUT", default_value_t = Dur(server_default().http2.idle_timeout.unwrap_or_default()))]
    pub idle_timeout: Dur,
    /// Every connection gets GOAWAY at this age (0: never).
    #[arg(long, env = "CA_MAX_CONNECTION_AGE", default_value_t = Dur(server_default().http2.max_connection_age.unwrap_or_default()))]
    pub max_connection_age: Dur,
    /// After GOAWAY, how long calls may take before the connection is closed regardless.
    #[arg(long, env = "CA_GOAWAY_GRACE", default_value_t = Dur(server_default().http2.goaway_grace))]
    pub goaway_grace: Dur,
    /// Concurrent HTTP/2 streams per connection (advertised and enforced).
    #[arg(long, env = "CA_MAX_STREAMS_PER_CONNECTION", default_value_t = server_default().http2.max_streams_per_connection)]
    pub max_streams_per_connection: u32,
    /// Largest request header list, in bytes (advertised and enforced).
    #[arg(long, env = "CA_MAX_HEADER_LIST_BYTES", default_value_t = server_default().http2.max_header_list_bytes)]
    pub max_header_list_bytes: u32,
    /// Deadline of every call, from its headers to its answer (covers a body that never comes).
    #[arg(long, env = "CA_REQUEST_TIMEOUT", default_value_t = Dur(server_default().http2.request_timeout.unwrap_or_default()))]
    pub request_timeout: Dur,
    /// Calls in flight from one source address, over all its connections.
    #[arg(long, env = "CA_MAX_CALLS_PER_SOURCE", default_value_t = server_default().http2.max_calls_per_source.unwrap_or(usize::MAX))]
    pub max_calls_per_source: usize,
    /// Calls in flight in all.
    #[arg(long, env = "CA_MAX_CALLS", default_value_t = server_default().http2.max_calls.unwrap_or(usize::MAX))]
    pub max_calls: usize,
    /// Largest CreateCertificate request message, in bytes.
    #[arg(long, env = "CA_MAX_REQUEST_BYTES", default_value_t = server_default().http2.max_message_bytes)]
    pub max_request_bytes: usize,
    /// Streams reset for the client's errors before its connection gets GOAWAY.
    #[arg(long, env = "CA_MAX_RESET_STREAMS", default_value_t = server_default().http2.max_reset_streams)]
    pub max_reset_streams: usize,
    /// Streams opened and reset by the client before being served ("rapid reset") before GOAWAY.
    #[arg(long, env = "CA_MAX_PENDING_ACCEPT_RESETS", default_value_t = server_default().http2.max_pending_accept_resets)]
    pub max_pending_accept_resets: usize,
    /// The operations endpoint's limits.
    #[command(flatten)]
    pub ops: OpsLimitArgs,
}

impl ServerLimitArgs {
    /// # Errors
    /// A zero count or deadline where one is required.
    pub fn to_limits(&self) -> anyhow::Result<ServerLimits> {
        let mut l = ServerLimits::default();
        l.accept.max_connections = positive("max-connections", self.max_connections)?;
        l.accept.max_connections_per_source = Some(positive(
            "max-connections-per-source",
            self.max_connections_per_source,
        )?);
        l.accept.max_pending_handshakes =
            positive("max-pending-handshakes", self.max_pending_handshakes)?;
        l.accept.max_pending_handshakes_per_source = positive(
            "max-pending-handshakes-per-source",
            self.max_pending_handshakes_per_source,
        )?;
        if l.accept.max_pending_handshakes_per_source >= l.accept.max_pending_handshakes {
            tracing::warn!(
                per_source = l.accept.max_pending_handshakes_per_source,
                pool = l.accept.max_pending_handshakes,
                "--max-pending-handshakes-per-source is not below --max-pending-handshakes: one source can take the whole admission pool"
            );
        }
        l.accept.handshake_timeout = nonzero("handshake-timeout", self.handshake_timeout)?;
        l.accept.admission_hold = self.admission_hold.0;
        l.http2.preface_timeout = nonzero("preface-timeout", self.preface_timeout)?;
        l.http2.idle_timeout = optional(self.idle_timeout);
        l.http2.max_connection_age = optional(self.max_connection_age);
        l.http2.goaway_grace = nonzero("goaway-grace", self.goaway_grace)?;
        l.http2.max_streams_per_connection = positive_u32(
            "max-streams-per-connection",
            self.max_streams_per_connection,
        )?;
        l.http2.max_header_list_bytes =
            positive_u32("max-header-list-bytes", self.max_header_list_bytes)?;
        l.http2.request_timeout = Some(nonzero("request-timeout", self.request_timeout)?);
        l.http2.max_message_bytes = positive("max-request-bytes", self.max_request_bytes)?;
        l.http2.max_calls_per_source =
            Some(positive("max-calls-per-source", self.max_calls_per_source)?);
        l.http2.max_calls = Some(positive("max-calls", self.max_calls)?);
        l.http2.max_reset_streams = positive("max-reset-streams", self.max_reset_streams)?;
        l.http2.max_pending_accept_resets =
            positive("max-pending-accept-resets", self.max_pending_accept_resets)?;
        l.ops = self.ops.to_limits()?;
        Ok(l)
    }
}

/// The agent's SDS socket limits.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Limits (SDS sockets, each its own)")]
pub struct AgentLimitArgs {
    /// Open connections per SDS socket.
    #[arg(long, env = "CA_SDS_MAX_CONNECTIONS", default_value_t = agent_default().accept.max_connections)]
    pub sds_max_connections: usize,
    /// SDS streams open at once per socket, over all its connections.
    #[arg(long, env = "CA_SDS_MAX_STREAMS", default_value_t = agent_default().http2.max_calls.unwrap_or(usize::MAX))]
    pub sds_max_streams: usize,
    /// An SDS connection holding no stream this long gets GOAWAY (0: never).
    #[arg(long, env = "CA_SDS_IDLE_TIMEOUT", default_value_t = Dur(agent_default().http2.idle_timeout.unwrap_or_default()))]
    pub sds_idle_timeout: Dur,
    /// Concurrent HTTP/2 streams per SDS connection.
    #[arg(long, env = "CA_SDS_MAX_STREAMS_PER_CONNECTION", default_value_t = agent_default().http2.max_streams_per_connection)]
    pub sds_max_streams_per_connection: u32,
    /// Resource names one SDS stream may subscribe to.
    #[arg(long, env = "CA_SDS_MAX_RESOURCE_NAMES", default_value_t = agent_default().max_resource_names_per_stream)]
    pub sds_max_resource_names: usize,
    /// Largest SDS request message, in bytes.
    #[arg(long, env = "CA_SDS_MAX_MESSAGE_BYTES", default_value_t = agent_default().http2.max_message_bytes)]
    pub sds_max_message_bytes: usize,
    /// Largest SDS request header list, in bytes.
    #[arg(long, env = "CA_SDS_MAX_HEADER_LIST_BYTES", default_value_t = agent_default().http2.max_header_list_bytes)]
    pub sds_max_header_list_bytes: u32,
    /// Time after connecting by which the HTTP/2 preface must arrive.
    #[arg(long, env = "CA_SDS_PREFACE_TIMEOUT", default_value_t = Dur(agent_default().http2.preface_timeout))]
    pub sds_preface_timeout: Dur,
    /// Streams reset for the proxy's errors before its connection gets GOAWAY.
    #[arg(long, env = "CA_SDS_MAX_RESET_STREAMS", default_value_t = agent_default().http2.max_reset_streams)]
    pub sds_max_reset_streams: usize,
    /// Streams opened and reset before being served ("rapid reset") before GOAWAY.
    #[arg(long, env = "CA_SDS_MAX_PENDING_ACCEPT_RESETS", default_value_t = agent_default().http2.max_pending_accept_resets)]
    pub sds_max_pending_accept_resets: usize,
    /// After GOAWAY, how long streams may stay before the connection is closed regardless.
    #[arg(long, env = "CA_SDS_GOAWAY_GRACE", default_value_t = Dur(agent_default().http2.goaway_grace))]
    pub sds_goaway_grace: Dur,
    /// The operations endpoint's limits.
    #[command(flatten)]
    pub ops: OpsLimitArgs,
}

impl AgentLimitArgs {
    /// # Errors
    /// A zero count or deadline.
    pub fn to_limits(&self) -> anyhow::Result<AgentLimits> {
        let mut l = AgentLimits::default();
        l.accept.max_connections = positive("sds-max-connections", self.sds_max_connections)?;
        l.accept.max_pending_handshakes = l.accept.max_connections;
        l.accept.max_pending_handshakes_per_source = l.accept.max_connections;
        l.http2.max_streams_per_connection = positive_u32(
            "sds-max-streams-per-connection",
            self.sds_max_streams_per_connection,
        )?;
        l.http2.max_calls = Some(positive("sds-max-streams", self.sds_max_streams)?);
        l.http2.idle_timeout = optional(self.sds_idle_timeout);
        l.max_resource_names_per_stream =
            positive("sds-max-resource-names", self.sds_max_resource_names)?;
        l.http2.max_message_bytes = positive("sds-max-message-bytes", self.sds_max_message_bytes)?;
        l.http2.max_header_list_bytes =
            positive_u32("sds-max-header-list-bytes", self.sds_max_header_list_bytes)?;
        l.http2.preface_timeout = nonzero("sds-preface-timeout", self.sds_preface_timeout)?;
        l.http2.max_reset_streams = positive("sds-max-reset-streams", self.sds_max_reset_streams)?;
        l.http2.max_pending_accept_resets = positive(
            "sds-max-pending-accept-resets",
            self.sds_max_pending_accept_resets,
        )?;
        l.http2.goaway_grace = nonzero("sds-goaway-grace", self.sds_goaway_grace)?;
        l.ops = self.ops.to_limits()?;
        Ok(l)
    }
}

/// The operations endpoint's limits.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Limits (metrics and health port)")]
pub struct OpsLimitArgs {
    /// Open connections to the metrics and health port.
    #[arg(long, env = "CA_OPS_MAX_CONNECTIONS", default_value_t = OpsLimits::default().max_connections)]
    pub ops_max_connections: usize,
    /// Open connections to the metrics and health port from one source address.
    #[arg(long, env = "CA_OPS_MAX_CONNECTIONS_PER_SOURCE", default_value_t = OpsLimits::default().max_connections_per_source)]
    pub ops_max_connections_per_source: usize,
    /// Time for a client of the metrics port to send its request headers.
    #[arg(long, env = "CA_OPS_HEADER_READ_TIMEOUT", default_value_t = Dur(OpsLimits::default().header_read_timeout))]
    pub ops_header_read_timeout: Dur,
    /// Time a metrics-port connection may stay open.
    #[arg(long, env = "CA_OPS_CONNECTION_TIMEOUT", default_value_t = Dur(OpsLimits::default().connection_timeout))]
    pub ops_connection_timeout: Dur,
}

impl OpsLimitArgs {
    fn to_limits(&self) -> anyhow::Result<OpsLimits> {
        Ok(OpsLimits {
            max_connections: positive("ops-max-connections", self.ops_max_connections)?,
            max_connections_per_source: positive(
                "ops-max-connections-per-source",
                self.ops_max_connections_per_source,
            )?,
            header_read_timeout: nonzero("ops-header-read-timeout", self.ops_header_read_timeout)?,
            connection_timeout: nonzero("ops-connection-timeout", self.ops_connection_timeout)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_show_as_they_are_written() {
        for s in ["250ms", "5s", "90s", "10m", "24h", "90d", "0s"] {
            let d: Dur = s.parse().unwrap();
            let shown = d.to_string();
            assert_eq!(shown.parse::<Dur>().unwrap(), d, "{s} -> {shown}");
        }
        assert_eq!(Dur(Duration::from_secs(600)).to_string(), "10m");
        assert_eq!(Dur(Duration::from_millis(1500)).to_string(), "1500ms");
    }
}
