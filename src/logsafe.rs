//! Logging what a peer sent, safely: escaped so it can never start a new log
//! line or carry terminal escapes, truncated so it can never make a line
//! large, and rate-limited per peer so one peer cannot flood the log.
//!
//! Every value that comes from outside (a proxy's NACK message, a token's
//! claims, a CSR's names, a CA's error message) is logged through [`peer`].

use crate::sync::LockExt;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::Mutex;

use tokio::time::Instant;

use crate::limits::{MAX_LOGGED_PEER_BYTES, PEER_WARN_BURST, PEER_WARN_PERIOD, PEER_WARN_TABLE};

/// A peer-supplied string for a log line: quoted, control and bidi
/// characters escaped, at most [`MAX_LOGGED_PEER_BYTES`] of the original
/// shown, followed by how much was cut.
pub fn peer(s: &str) -> Peer<'_> {
    Peer(s)
}

/// See [`peer`].
#[derive(Clone, Copy)]
pub struct Peer<'a>(&'a str);

impl fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        f.write_char('"')?;
        let mut shown = 0;
        for c in self.0.chars() {
            if shown + c.len_utf8() > MAX_LOGGED_PEER_BYTES {
                break;
            }
            shown += c.len_utf8();
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')?;
        if shown < self.0.len() {
            write!(f, "...(+{} bytes)", self.0.len() - shown)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Control characters (C0, DEL, C1), line and paragraph separators, and
/// bidirectional overrides, which can make a log line read differently from
/// what it holds.
/// Text for a terminal: every control and bidi character but the line
/// break escaped, so what a peer sent (an agent's name, a replica's
/// report) cannot move the cursor or rewrite what an operator reads.
pub fn terminal(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(|c| c != '\n' && needs_escape(c)) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if c != '\n' && needs_escape(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
        )
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// Whether to log a warning a peer caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it, noting how many were suppressed since the last one logged.
    Log {
        /// Warnings dropped since the last one logged.
        suppressed: u64,
    },
    /// Do not log it (counted).
    Suppress,
}

struct Window {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

/// Allows each peer [`PEER_WARN_BURST`] warnings per [`PEER_WARN_PERIOD`];
/// the rest are suppressed and counted, and the next warning logged says
/// how many were. At most [`PEER_WARN_TABLE`] peers are tracked.
pub struct WarnLimiter<K> {
    windows: Mutex<HashMap<K, Window>>,
}

impl<K: Hash + Eq + Clone> Default for WarnLimiter<K> {
    fn default() -> Self {
        Self {
            windows: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> WarnLimiter<K> {
    /// A limiter that has logged nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `key`'s warning at `now` should be logged.
    pub fn check(&self, key: &K, now: Instant) -> Verdict {
        let mut windows = self.windows.locked();
        if windows.len() >= PEER_WARN_TABLE && !windows.contains_key(key) {
            windows.retain(|_, w| now.duration_since(w.started) < PEER_WARN_PERIOD);
            if windows.len() >= PEER_WARN_TABLE {
                windows.clear();
            }
        }
        let w = windows.entry(key.clone()).or_insert(Window {
            started: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(w.started) >= PEER_WARN_PERIOD {
            w.started = now;
            w.logged = 0;
        }
        if w.logged < PEER_WARN_BURST {
            w.logged += 1;
            let suppressed = std::mem::take(&mut w.suppressed);
            Verdict::Log { suppressed }
        } else {
            w.suppressed += 1;
            Verdict::Suppress
        }
    }
}

/// Logs a warning caused by a peer, through `limiter` (keyed by the peer),
/// counting suppressed ones in `refusals`. Usage:
/// `peer_warn!(limiter, key, refusals, field = value, ...; "message")`.
#[macro_export]
macro_rules! peer_warn {
    ($limiter:expr, $key:expr, $refusals:expr, $($fields:tt)*) => {
        match $limiter.check(&$key, ::tokio::time::Instant::now()) {
            $crate::logsafe::Verdict::Log { suppressed: 0 } => ::tracing::warn!($($fields)*),
            $crate::logsafe::Verdict::Log { suppressed } => {
                ::tracing::warn!(suppressed_since_last = suppressed, $($fields)*)
            }
            $crate::logsafe::Verdict::Suppress => $refusals.suppressed(1),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn terminal_text_keeps_lines_and_escapes_the_rest() {
        assert!(matches!(
            terminal("a\nb"),
            std::borrow::Cow::Borrowed("a\nb")
        ));
        let shown = terminal("agent\x1b[2J\r\u{202e}x\ny");
        assert_eq!(shown, "agent\\u{1b}[2J\\u{d}\\u{202e}x\ny");
    }

    #[test]
    fn escapes_and_truncates() {
        let forged = "ok\n2026-01-01T00:00:00Z  INFO certificate issued\r\x1b[31mred\u{202e}";
        let shown = peer(forged).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\r') && !shown.contains('\x1b'));
        assert!(
            shown.contains("\\n2026") && shown.contains("\\u{1b}") && shown.contains("\\u{202e}")
        );
        assert!(shown.starts_with('"') && shown.ends_with('"'));

        let long = "a".repeat(10_000);
        let shown = peer(&long).to_string();
        assert!(shown.len() < MAX_LOGGED_PEER_BYTES + 40, "{}", shown.len());
        assert!(shown.ends_with(&format!("(+{} bytes)", 10_000 - MAX_LOGGED_PEER_BYTES)));
        // A multi-byte character is never cut in half.
        let wide = "é".repeat(1000);
        assert!(peer(&wide).to_string().starts_with("\"éé"));
        assert_eq!(peer("quote\"back\\").to_string(), r#""quote\"back\\""#);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_per_peer_and_reports_what_it_dropped() {
        let l = WarnLimiter::new();
        let now = Instant::now();
        for _ in 0..PEER_WARN_BURST {
            assert_eq!(l.check(&"a", now), Verdict::Log { suppressed: 0 });
        }
        for _ in 0..5 {
            assert_eq!(l.check(&"a", now), Verdict::Suppress);
        }
        // Another peer is not affected.
        assert_eq!(l.check(&"b", now), Verdict::Log { suppressed: 0 });
        let later = now + PEER_WARN_PERIOD + Duration::from_millis(1);
        assert_eq!(l.check(&"a", later), Verdict::Log { suppressed: 5 });
        assert_eq!(l.check(&"a", later), Verdict::Log { suppressed: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_stays_bounded() {
        let l = WarnLimiter::new();
        let now = Instant::now();
        for i in 0..(PEER_WARN_TABLE * 3) {
            l.check(&i, now);
        }
        assert!(l.windows.lock().unwrap().len() <= PEER_WARN_TABLE);
    }
}
