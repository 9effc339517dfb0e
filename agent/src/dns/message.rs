//! DNS messages: what the proxy does with a request (answer at once, forward, or drop), and
//! what it takes from an upstream answer. Pure functions over bytes, so they can be fuzzed.

use std::net::IpAddr;

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, RData, RecordType},
};

use super::names::{PolicyNames, Refusal, normalize};
use crate::config::Refusal as RefuseWith;

/// Largest DNS message over UDP the proxy reads (a longer datagram is cut to it: only its
/// question matters, since the proxy asks upstream with a query of its own).
pub const MAX_UDP_MESSAGE: usize = 4096;
/// The EDNS payload size the proxy offers upstream: answers fit its UDP buffer.
const UPSTREAM_EDNS_PAYLOAD: u16 = 1232;
/// DNS header length.
const HEADER: usize = 12;

/// The one question of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    /// Lower case, no trailing dot.
    pub name: String,
    pub qtype: RecordType,
}

/// Why the proxy answered without asking upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// The policy does not allow the name.
    Refused(Refusal),
    /// An allowed name, a record type nobody needs to connect (TXT, NULL, MX, …): empty answer.
    NoData,
    /// Not a standard query (opcode), or not class IN.
    NotImplemented,
    /// Unreadable, or not exactly one question.
    Malformed,
}

impl Local {
    pub fn reason(self) -> &'static str {
        match self {
            Local::Refused(r) => r.as_str(),
            Local::NoData => "record_type_not_forwarded",
            Local::NotImplemented => "not_a_standard_query",
            Local::Malformed => "malformed_request",
        }
    }
}

/// What to do with a request.
#[derive(Debug)]
pub enum Plan {
    /// Answer with these bytes (and record `why`).
    Reply {
        bytes: Vec<u8>,
        question: Option<Question>,
        why: Local,
    },
    /// Ask upstream. `would_refuse`: audit mode lets through what enforce mode would have
    /// answered locally.
    Forward {
        question: Question,
        would_refuse: Option<Local>,
    },
    /// Not a request at all (too short, or a response): no answer.
    Drop,
}

/// Decides what to do with one request from a guarded process.
pub fn plan(request: &[u8], names: &PolicyNames, audit: bool, refuse: RefuseWith) -> Plan {
    if request.len() < HEADER || request[2] & 0x80 != 0 {
        return Plan::Drop;
    }
    let id = u16::from_be_bytes([request[0], request[1]]);
    let opcode = (request[2] >> 3) & 0x0f;
    let header_error = |code: ResponseCode, why: Local| Plan::Reply {
        bytes: header_reply(request, code),
        question: None,
        why,
    };
    if opcode != 0 {
        return header_error(ResponseCode::NotImp, Local::NotImplemented);
    }
    let msg = match Message::from_vec(request) {
        Ok(m) => m,
        Err(_) => return header_error(ResponseCode::FormErr, Local::Malformed),
    };
    if msg.queries.len() != 1 || !msg.answers.is_empty() || !msg.authorities.is_empty() {
        return header_error(ResponseCode::FormErr, Local::Malformed);
    }
    let q = &msg.queries[0];
    let question = Question {
        id,
        name: normalize(&q.name().to_ascii()),
        qtype: q.query_type(),
    };
    let local = |why: Local| {
        let code = match why {
            Local::Refused(_) => match refuse {
                RefuseWith::Refused => ResponseCode::Refused,
                RefuseWith::Nxdomain => ResponseCode::NXDomain,
            },
            Local::NoData => ResponseCode::NoError,
            Local::NotImplemented => ResponseCode::NotImp,
            Local::Malformed => ResponseCode::FormErr,
        };
        Plan::Reply {
            bytes: reply(&msg, code),
            question: Some(question.clone()),
            why,
        }
    };
    if q.query_class() != DNSClass::IN {
        return local(Local::NotImplemented);
    }
    // A label holding a dot or an odd byte prints escaped ("x\\.foo"): no allowed name
    // looks like that, and matching on the text would be fooled by it.
    if question.name.contains('\\') {
        return local(Local::Refused(Refusal::NotAllowed));
    }
    let refused = match names.rules_for(&question.name) {
        Ok(_) => {
            let wanted = matches!(
                question.qtype,
                RecordType::A | RecordType::AAAA | RecordType::CNAME
            );
            (!wanted).then_some(Local::NoData)
        }
        Err(r) => Some(Local::Refused(r)),
    };
    match refused {
        Some(why) if !audit => local(why),
        would_refuse => Plan::Forward {
            question,
            would_refuse,
        },
    }
}

/// A reply to `req` with its question, RD copied, RA set, and `code`.
fn reply(req: &Message, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::response(req.metadata.id, req.metadata.op_code);
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = code;
    m.queries = req.queries.clone();
    m.to_vec().unwrap_or_else(|_| {
        let mut h = vec![0u8; HEADER];
        h[..2].copy_from_slice(&req.metadata.id.to_be_bytes());
        header_only(&mut h, code);
        h
    })
}

/// A header-only reply (for requests that cannot be parsed): same id and opcode.
fn header_reply(request: &[u8], code: ResponseCode) -> Vec<u8> {
    let mut h = request[..HEADER].to_vec();
    header_only(&mut h, code);
    h
}

fn header_only(h: &mut [u8], code: ResponseCode) {
    h[2] = 0x80 | (h[2] & 0x79); // QR, keep opcode and RD
    h[3] = 0x80 | (code.low() & 0x0f); // RA, rcode
    h[4..HEADER].fill(0);
}

/// The policy's refusal (`[dns] refuse`: REFUSED or NXDOMAIN) to a request `plan` would have
/// forwarded: a limit refused it (the name budget, the quota of learned pairs, a private
/// answer).
pub fn refusal(request: &[u8], refuse: RefuseWith) -> Vec<u8> {
    let code = match refuse {
        RefuseWith::Refused => ResponseCode::Refused,
        RefuseWith::Nxdomain => ResponseCode::NXDomain,
    };
    match Message::from_vec(request) {
        Ok(m) => reply(&m, code),
        Err(_) if request.len() >= HEADER => header_reply(request, code),
        Err(_) => Vec::new(),
    }
}

/// A SERVFAIL for `q` (upstream failed, or the answer could not be learned).
pub fn servfail(q: &Question) -> Vec<u8> {
    let mut m = Message::response(q.id, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.metadata.response_code = ResponseCode::ServFail;
    if let Ok(name) = hickory_proto::rr::Name::from_ascii(&q.name) {
        m.add_query(hickory_proto::op::Query::query(name, q.qtype));
    }
    m.to_vec().unwrap_or_else(|_| {
        let mut h = vec![0u8; HEADER];
        h[..2].copy_from_slice(&q.id.to_be_bytes());
        header_only(&mut h, ResponseCode::ServFail);
        h
    })
}

/// The mnemonic of a response code (as dig prints it).
pub fn rcode_name(low: u8) -> String {
    match low & 0x0f {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

/// The query the proxy sends upstream for `q`: a fresh message with `id`, the question in lower
/// case, recursion desired and an EDNS record of the proxy's own. Nothing else of the client's
/// request (extra records, EDNS options such as client subnet, header bits, trailing bytes,
/// letter case) leaves the host.
pub fn upstream_query(q: &Question, id: u16) -> Result<Vec<u8>, &'static str> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let name =
        hickory_proto::rr::Name::from_ascii(format!("{}.", q.name)).map_err(|_| "bad name")?;
    m.add_query(hickory_proto::op::Query::query(name, q.qtype));
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_max_payload(UPSTREAM_EDNS_PAYLOAD);
    m.set_edns(edns);
    m.to_vec().map_err(|_| "query cannot be encoded")
}

/// Length of the question section of a request (name, type, class), read from the wire.
fn question_len(request: &[u8]) -> Option<usize> {
    let mut i = HEADER;
    loop {
        let l = *request.get(i)? as usize;
        if l & 0xc0 != 0 {
            return None;
        }
        i += 1 + l;
        if l == 0 {
            break;
        }
    }
    let end = i + 4;
    (end <= request.len()).then_some(end - HEADER)
}

/// Puts the client's own question (its letter case) into `reply`, whose question is the same
/// one in lower case.
pub fn restore_question(reply: &mut [u8], request: &[u8]) {
    let Some(n) = question_len(request) else {
        return;
    };
    let (Some(ours), Some(theirs)) = (
        reply.get(HEADER..HEADER + n),
        request.get(HEADER..HEADER + n),
    ) else {
        return;
    };
    if ours.eq_ignore_ascii_case(theirs) {
        reply[HEADER..HEADER + n].copy_from_slice(&request[HEADER..HEADER + n]);
    }
}

/// What an upstream answer says about the question.
#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    pub rcode: String,
    /// Addresses for the name (at the end of its CNAME chain) with their TTLs.
    pub addrs: Vec<(IpAddr, u32)>,
    /// The CNAME chain, in order.
    pub cnames: Vec<String>,
    pub truncated: bool,
}

/// Checks that `response` answers `q` (id, question) and reads it. With `max_ttl`, TTLs above
/// it are lowered and the message re-encoded (`Some(bytes)`), so clients never cache an
/// address longer than the agent keeps it allowed.
pub fn read_answer(
    response: &[u8],
    q: &Question,
    max_ttl: u32,
) -> Result<(Answer, Option<Vec<u8>>), &'static str> {
    let mut msg = Message::from_vec(response).map_err(|_| "unreadable answer")?;
    if msg.metadata.message_type != MessageType::Response || msg.metadata.id != q.id {
        return Err("not an answer to this query");
    }
    match msg.queries.as_slice() {
        [one] if normalize(&one.name().to_ascii()) == q.name && one.query_type() == q.qtype => {}
        _ => return Err("answer to another question"),
    }
    let mut answer = Answer {
        rcode: rcode_name(msg.metadata.response_code.low()),
        truncated: msg.metadata.truncation,
        ..Default::default()
    };
    // Follow the chain from the asked name; records of other names teach nothing.
    let mut chain = vec![q.name.clone()];
    for _ in 0..16 {
        let mut grew = false;
        for r in &msg.answers {
            if let RData::CNAME(c) = &r.data {
                let owner = normalize(&r.name.to_ascii());
                let target = normalize(&c.0.to_ascii());
                if chain.contains(&owner) && !chain.contains(&target) {
                    chain.push(target);
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }
    for r in &msg.answers {
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        if chain.contains(&normalize(&r.name.to_ascii())) {
            answer.addrs.push((ip, r.ttl));
        }
    }
    answer.cnames = chain.split_off(1);
    let too_long = msg
        .answers
        .iter()
        .chain(&msg.authorities)
        .any(|r| r.ttl > max_ttl);
    let rewritten = if too_long {
        for r in msg.answers.iter_mut().chain(msg.authorities.iter_mut()) {
            r.ttl = r.ttl.min(max_ttl);
        }
        Some(msg.to_vec().map_err(|_| "answer cannot be re-encoded")?)
    } else {
        None
    };
    Ok((answer, rewritten))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use agent_common::PROTO_TCP;
    use hickory_proto::{
        op::Query,
        rr::{Name, Record, rdata},
    };

    use super::*;
    use crate::config::HostnameRule;

    fn names() -> PolicyNames {
        PolicyNames::new(&[HostnameRule {
            name: "api.example.com".into(),
            protos: PROTO_TCP,
            ports: (443, 443),
            line: 1,
        }])
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn rcode(bytes: &[u8]) -> ResponseCode {
        Message::from_vec(bytes).unwrap().metadata.response_code
    }

    #[test]
    fn a_limit_refuses_with_the_configured_code_and_the_question() {
        let req = query("a.example.com.", RecordType::AAAA);
        for (with, code) in [
            (RefuseWith::Refused, ResponseCode::Refused),
            (RefuseWith::Nxdomain, ResponseCode::NXDomain),
        ] {
            let bytes = refusal(&req, with);
            let m = Message::from_vec(&bytes).unwrap();
            assert_eq!((m.metadata.id, m.metadata.response_code), (7, code));
            assert_eq!(m.queries, Message::from_vec(&req).unwrap().queries);
        }
    }

    #[test]
    fn allowed_names_are_forwarded_with_their_rules() {
        match plan(
            &query("API.example.com.", RecordType::A),
            &names(),
            false,
            RefuseWith::Refused,
        ) {
            Plan::Forward {
                question,
                would_refuse: None,
            } => assert_eq!(question.name, "api.example.com"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_names_are_refused_or_nxdomain_and_not_forwarded() {
        for (with, code) in [
            (RefuseWith::Refused, ResponseCode::Refused),
            (RefuseWith::Nxdomain, ResponseCode::NXDomain),
        ] {
            match plan(
                &query("evil.example.net", RecordType::A),
                &names(),
                false,
                with,
            ) {
                Plan::Reply { bytes, why, .. } => {
                    assert_eq!(why, Local::Refused(Refusal::NotAllowed));
                    assert_eq!(rcode(&bytes), code);
                    assert_eq!(Message::from_vec(&bytes).unwrap().metadata.id, 7);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn txt_and_null_for_allowed_names_get_an_empty_answer() {
        for t in [RecordType::TXT, RecordType::NULL, RecordType::MX] {
            match plan(
                &query("api.example.com", t),
                &names(),
                false,
                RefuseWith::Refused,
            ) {
                Plan::Reply { bytes, why, .. } => {
                    assert_eq!(why, Local::NoData);
                    assert_eq!(rcode(&bytes), ResponseCode::NoError);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn audit_mode_forwards_what_enforce_would_refuse() {
        match plan(
            &query("evil.example.net", RecordType::TXT),
            &names(),
            true,
            RefuseWith::Refused,
        ) {
            Plan::Forward { would_refuse, .. } => {
                assert_eq!(would_refuse, Some(Local::Refused(Refusal::NotAllowed)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_gets_formerr_or_is_dropped() {
        assert!(matches!(
            plan(b"short", &names(), false, RefuseWith::Refused),
            Plan::Drop
        ));
        let mut junk = vec![0x12, 0x34, 0x01, 0x00, 0, 5, 0, 0, 0, 0, 0, 0];
        junk.extend_from_slice(&[0xff; 20]);
        match plan(&junk, &names(), false, RefuseWith::Refused) {
            Plan::Reply { bytes, why, .. } => {
                assert_eq!(why, Local::Malformed);
                assert_eq!(&bytes[..2], &[0x12, 0x34]);
                assert_eq!(bytes[3] & 0x0f, 1, "FORMERR");
                assert_eq!(bytes.len(), HEADER);
            }
            other => panic!("{other:?}"),
        }
        // A response sent to the proxy is not answered.
        let mut resp = query("api.example.com", RecordType::A);
        resp[2] |= 0x80;
        assert!(matches!(
            plan(&resp, &names(), false, RefuseWith::Refused),
            Plan::Drop
        ));
    }

    #[test]
    fn escaped_labels_are_refused() {
        // One label "x.api" under example.com: prints as x\.api.example.com.
        let mut q = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x05x.api\x07example\x03com\x00\x00\x01\x00\x01");
        let wild = PolicyNames::new(&[HostnameRule {
            name: "*.api.example.com".into(),
            protos: PROTO_TCP,
            ports: (443, 443),
            line: 1,
        }]);
        match plan(&q, &wild, false, RefuseWith::Refused) {
            Plan::Reply { why, .. } => assert_eq!(why, Local::Refused(Refusal::NotAllowed)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_upstream_query_is_the_proxys_own_and_the_reply_keeps_the_clients_case() {
        let q = Question {
            id: 7,
            name: "api.example.com".into(),
            qtype: RecordType::A,
        };
        let up = Message::from_vec(&upstream_query(&q, 99).unwrap()).unwrap();
        assert_eq!(up.metadata.id, 99);
        assert_eq!(up.queries.len(), 1);
        assert_eq!(up.queries[0].name().to_ascii(), "api.example.com.");
        assert!(up.answers.is_empty() && up.authorities.is_empty());
        assert_eq!(
            up.edns.as_ref().unwrap().max_payload(),
            UPSTREAM_EDNS_PAYLOAD
        );
        // The client asked in mixed case; the answer goes back with its question as asked.
        let request = query("API.Example.com", RecordType::A);
        let mut reply = Message::response(7, OpCode::Query);
        reply.add_query(Query::query(
            Name::from_ascii("api.example.com.").unwrap(),
            RecordType::A,
        ));
        let mut bytes = reply.to_vec().unwrap();
        restore_question(&mut bytes, &request);
        let back = Message::from_vec(&bytes).unwrap();
        assert_eq!(back.queries[0].name().to_ascii(), "API.Example.com.");
    }

    #[test]
    fn answers_follow_the_cname_chain_and_ttls_are_capped() {
        let q = Question {
            id: 9,
            name: "api.example.com".into(),
            qtype: RecordType::A,
        };
        let mut m = Message::response(9, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("api.example.com.").unwrap(),
            RecordType::A,
        ));
        let n = |s: &str| Name::from_ascii(s).unwrap();
        m.add_answer(Record::from_rdata(
            n("api.example.com."),
            300,
            RData::CNAME(rdata::CNAME(n("edge.cdn.net."))),
        ));
        m.add_answer(Record::from_rdata(
            n("edge.cdn.net."),
            86_400,
            RData::A(rdata::A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        m.add_answer(Record::from_rdata(
            n("unrelated.net."),
            60,
            RData::A(rdata::A(Ipv4Addr::new(192, 0, 2, 99))),
        ));
        let bytes = m.to_vec().unwrap();
        let (a, rewritten) = read_answer(&bytes, &q, 3600).unwrap();
        assert_eq!(a.addrs, vec![("192.0.2.1".parse().unwrap(), 86_400)]);
        assert_eq!(a.cnames, vec!["edge.cdn.net".to_string()]);
        let capped = Message::from_vec(&rewritten.unwrap()).unwrap();
        assert!(capped.answers.iter().all(|r| r.ttl <= 3600));
        // Another id or question is not an answer.
        let other = Question {
            id: 10,
            ..q.clone()
        };
        assert!(read_answer(&bytes, &other, 3600).is_err());
    }
}
