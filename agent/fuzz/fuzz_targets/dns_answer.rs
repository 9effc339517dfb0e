//! Any bytes an upstream (or a forger) sends back: `read_answer` must not panic, and what it
//! learns must be addresses for the asked name only.
#![no_main]

use egress_guard::dns::message::{Question, read_answer};
use hickory_proto::rr::RecordType;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let q = Question {
        id: u16::from_be_bytes([
            data.first().copied().unwrap_or(0),
            data.get(1).copied().unwrap_or(0),
        ]),
        name: "api.example.com".into(),
        qtype: RecordType::A,
    };
    if let Ok((answer, rewritten)) = read_answer(data, &q, 300) {
        assert!(answer.addrs.len() <= data.len() / 16 + 1);
        if let Some(bytes) = rewritten {
            let again = read_answer(&bytes, &q, 300).expect("a rewritten answer reads back");
            assert_eq!(again.0.addrs.len(), answer.addrs.len());
            assert!(again.0.addrs.iter().all(|(_, ttl)| *ttl <= 300));
        }
    }
});
