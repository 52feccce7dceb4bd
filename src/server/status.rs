//! The one place where errors become gRPC statuses (and metric labels).

use tonic::Status;

use super::metrics::Metrics;
use crate::ca;

/// What every authentication failure looks like to the caller: nothing that
/// tells an attacker which check failed. The reason is logged instead.
pub(super) fn unauthenticated() -> Status {
    Status::unauthenticated("authentication failed")
}

/// Longest status message sent: errors may quote the CSR, and a message
/// travels in a header the client must be able to take.
const MAX_MESSAGE_BYTES: usize = 1024;

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("...");
    }
    message
}

/// Maps a CA error to the status Istio's clients expect.
pub(super) fn from_ca(e: &ca::Error) -> Status {
    use ca::Error as E;
    match e {
        E::CsrTooLarge { .. }
        | E::CsrMalformed(_)
        | E::CsrKeyType(_)
        | E::CsrSignature(_)
        | E::TtlTooLong { .. } => Status::invalid_argument(bounded(e.to_string())),
        E::IdentityMismatch { .. } | E::WrongTrustDomain { .. } => {
            Status::permission_denied(bounded(e.to_string()))
        }
        E::SignerExpired => {
            Status::unavailable("the CA cannot sign: its signing certificate has expired")
        }
        E::Key(_) | E::Cert(_) | E::Signing(_) | E::Material(_) | E::Store { .. } => {
            Status::internal("signing failed")
        }
    }
}

/// Counts a refused request under Istio's metric for its kind.
pub(super) fn count(metrics: &Metrics, e: &ca::Error) {
    use ca::Error as E;
    let kind = match e {
        E::CsrTooLarge { .. } | E::CsrMalformed(_) | E::CsrKeyType(_) | E::CsrSignature(_) => {
            metrics.csr_parsing_err.inc();
            return;
        }
        E::IdentityMismatch { .. } | E::WrongTrustDomain { .. } => "identity_mismatch",
        E::TtlTooLong { .. } => "ttl",
        E::SignerExpired => "signer_expired",
        E::Key(_) | E::Cert(_) | E::Signing(_) | E::Material(_) | E::Store { .. } => "internal",
    };
    metrics.csr_sign_err.with_label_values(&[kind]).inc();
}
