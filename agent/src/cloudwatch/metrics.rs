//! CloudWatch metrics in the Embedded Metric Format: counted from the audit records and
//! written into the same log stream (through the spool, so they are not lost either); CloudWatch
//! turns them into metrics in the `EgressGuard` namespace, per policy and instance.
//!
//! Every emission also carries `Heartbeat` = 1, per instance and without dimensions: the
//! shipped template alarms when it stops arriving (missing data is breaching), so a host whose
//! agent died or never started is noticed even though it sends nothing.

use std::{collections::BTreeMap, time::SystemTime};

use serde_json::{Value, json};

pub const NAMESPACE: &str = "EgressGuard";

/// Counts since the last emission.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Policy → (denied connections/sends/packets/sockets, refused DNS queries).
    per_policy: BTreeMap<String, (u64, u64)>,
    events_lost: u64,
}

impl Metrics {
    /// Counts what `record` says.
    pub fn count(&mut self, record: &Value) {
        let ty = record["type"].as_str().unwrap_or("");
        let policy = record["policy"].as_str();
        match (ty, record["verdict"].as_str(), policy) {
            (t, Some("deny"), Some(p)) if t.starts_with("net.") => {
                self.per_policy.entry(p.to_string()).or_default().0 += 1
            }
            ("dns", Some("refuse"), Some(p)) => {
                self.per_policy.entry(p.to_string()).or_default().1 += 1
            }
            ("agent.events_lost", _, _) => {
                self.events_lost += record["count"].as_u64().unwrap_or(0)
            }
            _ => {}
        }
    }

    /// Policies that exist, so a quiet policy reports zeros rather than nothing.
    pub fn know_policies(&mut self, names: &[String]) {
        for n in names.iter().filter(|n| !n.is_empty()) {
            self.per_policy.entry(n.clone()).or_default();
        }
    }

    /// The EMF records for the period that ends now (one per policy, one for the agent), and
    /// zeroed counters.
    pub fn take(&mut self, instance: &str, spool_pending_bytes: u64) -> Vec<Value> {
        let ts = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let ts_text = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
        let mut out = Vec::new();
        for (policy, (denied, refused)) in &mut self.per_policy {
            out.push(json!({
                "_aws": { "Timestamp": ts, "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    "Dimensions": [["Policy", "Instance"]],
                    "Metrics": [
                        { "Name": "DeniedConnections", "Unit": "Count" },
                        { "Name": "RefusedDnsQueries", "Unit": "Count" },
                    ],
                }]},
                "type": "metrics", "ts": ts_text,
                "Policy": policy, "Instance": instance,
                "DeniedConnections": *denied, "RefusedDnsQueries": *refused,
            }));
            *denied = 0;
            *refused = 0;
        }
        out.push(json!({
            "_aws": { "Timestamp": ts, "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [["Instance"]],
                "Metrics": [
                    { "Name": "EventsLost", "Unit": "Count" },
                    { "Name": "SpoolPendingBytes", "Unit": "Bytes" },
                ],
            }, {
                "Namespace": NAMESPACE,
                // Per instance, and one series for the whole fleet (no dimension).
                "Dimensions": [["Instance"], []],
                "Metrics": [{ "Name": "Heartbeat", "Unit": "Count" }],
            }]},
            "type": "metrics", "ts": ts_text,
            "Instance": instance,
            "EventsLost": self.events_lost, "SpoolPendingBytes": spool_pending_bytes,
            "Heartbeat": 1,
        }));
        self.events_lost = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_refusals_and_losses_are_counted_per_policy() {
        let mut m = Metrics::default();
        m.know_policies(&["quiet".into()]);
        for r in [
            json!({"type": "net.connect", "verdict": "deny", "policy": "app"}),
            json!({"type": "net.packet", "verdict": "deny", "policy": "app"}),
            json!({"type": "net.connect", "verdict": "allow", "policy": "app"}),
            json!({"type": "net.connect", "verdict": "would_deny", "policy": "app"}),
            json!({"type": "dns", "verdict": "refuse", "policy": "app"}),
            json!({"type": "agent.events_lost", "count": 7}),
        ] {
            m.count(&r);
        }
        let recs = m.take("i-123", 42);
        let app = recs.iter().find(|r| r["Policy"] == "app").unwrap();
        assert_eq!(app["DeniedConnections"], 2);
        assert_eq!(app["RefusedDnsQueries"], 1);
        assert_eq!(app["_aws"]["CloudWatchMetrics"][0]["Namespace"], NAMESPACE);
        let quiet = recs.iter().find(|r| r["Policy"] == "quiet").unwrap();
        assert_eq!(quiet["DeniedConnections"], 0);
        let agent = recs.iter().find(|r| r.get("Policy").is_none()).unwrap();
        assert_eq!(
            (
                agent["EventsLost"].as_u64(),
                agent["SpoolPendingBytes"].as_u64()
            ),
            (Some(7), Some(42))
        );
        assert_eq!(agent["Heartbeat"], 1);
        let directives = agent["_aws"]["CloudWatchMetrics"].as_array().unwrap();
        let heartbeat = directives
            .iter()
            .find(|d| d["Metrics"][0]["Name"] == "Heartbeat")
            .expect("a Heartbeat directive");
        assert_eq!(heartbeat["Dimensions"], json!([["Instance"], []]));
        // The next period starts from zero.
        let again = m.take("i-123", 0);
        assert!(
            again
                .iter()
                .all(|r| r["DeniedConnections"].as_u64().unwrap_or(0) == 0)
        );
        assert_eq!(again.last().unwrap()["EventsLost"], 0);
    }
}
