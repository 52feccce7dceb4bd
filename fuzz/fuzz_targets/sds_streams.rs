//! SDS streams: any sequence of requests on state-of-the-world and delta
//! streams (any names, right, stale or garbage nonces, ACKs, NACKs) mixed
//! with certificate rotations, expiry and bundle changes never sends a
//! stream a resource it does not subscribe to, a key it did not ask for,
//! another identity's, an expired or a stale one, nor re-sends what a delta
//! client holds (`props/sds.rs`).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

#[path = "../props/sds.rs"]
mod sds;
#[path = "../props/sds_events.rs"]
mod sds_events;
use sds::World;
use sds_events::{Event, Name, NonceSel, Pool, VersionSel};

fn pool() -> &'static Pool {
    static P: OnceLock<Pool> = OnceLock::new();
    P.get_or_init(Pool::generate)
}

fn name(u: &mut Unstructured<'_>) -> Result<Name> {
    Ok(match u.int_in_range(0..=9u8)? {
        0 | 1 => Name::Default,
        2 => Name::RootCa,
        3 => Name::Own,
        4 => Name::TrustDomain,
        5 => Name::Other,
        6 => Name::OtherDomain,
        7 => Name::Near(u.arbitrary()?),
        8 => {
            let len = u.int_in_range(0..=12usize)?;
            Name::Garbage(String::from_utf8_lossy(u.bytes(len)?).into_owned())
        }
        _ => Name::Garbage(format!("spiffe://{}", u.arbitrary::<u8>()? % 4)),
    })
}

fn names(u: &mut Unstructured<'_>, max: usize) -> Result<Vec<Name>> {
    (0..u.int_in_range(0..=max)?).map(|_| name(u)).collect()
}

fn nonce(u: &mut Unstructured<'_>) -> Result<NonceSel> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => NonceSel::Empty,
        1..=3 => NonceSel::Last,
        4 => NonceSel::Earlier(u.arbitrary()?),
        _ => NonceSel::Garbage(u.int_in_range(0..=40u8)?.to_string()),
    })
}

fn event(u: &mut Unstructured<'_>) -> Result<Event> {
    Ok(match u.int_in_range(0..=12u8)? {
        0 => Event::Open(u.arbitrary()?),
        1..=3 => Event::Sotw {
            stream: u.arbitrary()?,
            names: names(u, 8)?,
            nonce: nonce(u)?,
            nack: u.ratio(1, 5)?,
            wrong_type: u.ratio(1, 40)?,
        },
        4..=6 => Event::Delta {
            stream: u.arbitrary()?,
            subscribe: names(u, 4)?,
            unsubscribe: names(u, 2)?,
            initial: (0..u.int_in_range(0..=3)?)
                .map(|_| {
                    let v = match u.int_in_range(0..=2u8)? {
                        0 => VersionSel::Current,
                        1 => VersionSel::Cert(u.arbitrary()?),
                        _ => VersionSel::Garbage(u.arbitrary::<u8>()?.to_string()),
                    };
                    Ok((name(u)?, v))
                })
                .collect::<Result<_>>()?,
            nonce: nonce(u)?,
            nack: u.ratio(1, 5)?,
        },
        7 | 8 => Event::Rotate(u.arbitrary()?),
        9 => Event::Expire,
        _ => Event::Bundle(u.arbitrary()?, u.arbitrary()?),
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut world = World::new(pool());
    for _ in 0..64 {
        let Ok(e) = event(&mut u) else { break };
        if let Err(violation) = world.apply(&e) {
            panic!("{violation} (after {e:?})");
        }
        if u.is_empty() {
            break;
        }
    }
});
