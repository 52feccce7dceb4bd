//! Rotation: any sequence of steps on the CA's authority set (prepare with
//! any authority, activate and retire forced or through their gates,
//! steps abandoned, arbitrary sets loaded, the clock moving either way)
//! never leaves it without exactly one active signer, which signs whenever
//! it is valid (`props/rotation.rs`).
#![no_main]

use std::sync::OnceLock;
use std::time::SystemTime;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

#[path = "../props/rotation.rs"]
mod rotation;
use rotation::{Machine, Op, Pool};

fn pool() -> &'static Pool {
    static P: OnceLock<Pool> = OnceLock::new();
    P.get_or_init(|| Pool::generate(SystemTime::now()))
}

fn op(u: &mut Unstructured<'_>, depth: u8) -> Result<Op> {
    Ok(match u.int_in_range(0..=8u8)? {
        0 | 1 => Op::Prepare(u.arbitrary()?),
        2 => Op::Activate,
        3 => Op::Retire,
        4 => Op::GatedActivate(
            (0..u.int_in_range(0..=3)?)
                .map(|_| u.int_in_range(0..=12))
                .collect::<Result<_>>()?,
        ),
        5 => Op::GatedRetire(
            (0..u.int_in_range(0..=3)?)
                .map(|_| u.int_in_range(0..=3600))
                .collect::<Result<_>>()?,
        ),
        6 if depth == 0 => Op::Abandon(Box::new(op(u, 1)?)),
        6 => Op::Activate,
        7 => {
            let n = u.int_in_range(0..=4)?;
            let members = (0..n)
                .map(|_| Ok((u.arbitrary()?, u.arbitrary()?)))
                .collect::<Result<_>>()?;
            Op::Load(members, u.int_in_range(0..=12)?)
        }
        _ => {
            if u.arbitrary()? {
                Op::Forward(u.arbitrary()?)
            } else {
                Op::Back(u.arbitrary()?)
            }
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let pool = pool();
    let mut u = Unstructured::new(data);
    let mut m = Machine::new(pool);
    for _ in 0..32 {
        let Ok(op) = op(&mut u, 0) else { break };
        m.apply(&op).unwrap_or_else(|e| panic!("{e}"));
        if u.is_empty() {
            break;
        }
    }
});
