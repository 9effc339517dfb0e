//! Any bytes a guarded process sends to the DNS proxy: `plan` must not panic, and what it
//! answers must be a DNS response with the request's id.
#![no_main]

use egress_guard::{
    config::{HostnameRule, Refusal},
    dns::{
        message::{Plan, plan},
        names::PolicyNames,
    },
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let names = PolicyNames::new(&[
        HostnameRule {
            name: "api.example.com".into(),
            protos: 1,
            ports: (443, 443),
            line: 1,
        },
        HostnameRule {
            name: "*.svc.example".into(),
            protos: 1,
            ports: (443, 443),
            line: 2,
        },
    ]);
    for (audit, refuse) in [(false, Refusal::Refused), (true, Refusal::Nxdomain)] {
        if let Plan::Reply { bytes, .. } = plan(data, &names, audit, refuse) {
            assert!(bytes.len() >= 12, "a reply has a header");
            assert_eq!(bytes[..2], data[..2], "a reply carries the request's id");
            assert_ne!(bytes[2] & 0x80, 0, "a reply is a response");
        }
    }
});
