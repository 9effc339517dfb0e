//! `[cloudwatch]`: shipping the audit trail to CloudWatch Logs; the table's schema, defaults and
//! checks.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::{LineIndex, Problem};

pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/egress-guard/spool";

/// `[cloudwatch]`: shipping the audit trail to CloudWatch Logs.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudWatch {
    pub log_group: String,
    /// Default: the EC2 instance id, else the host name.
    pub log_stream: Option<String>,
    /// Default: the SDK's (AWS_REGION, the profile, IMDS on EC2).
    pub region: Option<String>,
    /// A VPC endpoint, or a test server.
    pub endpoint: Option<String>,
    pub flush_interval: Duration,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    /// How often the EMF metrics are written (default 60 s).
    pub metrics_interval: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCloudWatch {
    log_group: String,
    log_stream: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
    flush_interval: Option<String>,
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<u64>,
    metrics_interval: Option<String>,
}

/// The `[cloudwatch]` step of `validate`: absent or invalid, nothing is shipped; every problem
/// is reported on the table's line.
pub(super) fn validate_cloudwatch_table(
    raw: Option<Spanned<RawCloudWatch>>,
    lines: &LineIndex,
    problems: &mut Vec<Problem>,
) -> Option<CloudWatch> {
    let mut problem = |line: usize, reason: String| problems.push(Problem { line, reason });
    raw.and_then(|c| {
        let line = lines.of(&c);
        validate_cloudwatch(c.into_inner())
            .map_err(|reasons| {
                for r in reasons {
                    problem(line, r);
                }
            })
            .ok()
    })
}

fn validate_cloudwatch(raw: RawCloudWatch) -> Result<CloudWatch, Vec<String>> {
    let mut problems = Vec::new();
    let name_ok = |s: &str, extra: &str| {
        !s.is_empty()
            && s.len() <= 512
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/#".contains(c) || extra.contains(c))
    };
    if !name_ok(&raw.log_group, "") {
        problems.push(format!(
            "[cloudwatch] log_group {:?}: 1 to 512 characters of letters, digits, '.', '_', '-', '/' and '#'",
            raw.log_group
        ));
    }
    if let Some(st) = &raw.log_stream
        && (st.is_empty() || st.len() > 512 || st.contains([':', '*']))
    {
        problems.push(format!(
            "[cloudwatch] log_stream {st:?}: 1 to 512 characters, no ':' or '*'"
        ));
    }
    if let Some(e) = &raw.endpoint
        && !(e.starts_with("https://") || e.starts_with("http://"))
    {
        problems.push(format!(
            "[cloudwatch] endpoint {e:?} must be a URL (https://logs.REGION.amazonaws.com, a VPC endpoint, or http:// for a test server)"
        ));
    }
    let flush_interval = match raw.flush_interval {
        Some(t) => match humantime::parse_duration(&t) {
            Ok(d) if (Duration::from_millis(100)..=Duration::from_secs(60)).contains(&d) => d,
            Ok(_) => {
                problems.push(format!(
                    "[cloudwatch] flush_interval = {t:?}: must be from 100ms to 60s"
                ));
                Duration::from_secs(1)
            }
            Err(e) => {
                problems.push(format!("[cloudwatch] flush_interval = {t:?}: {e}"));
                Duration::from_secs(1)
            }
        },
        None => Duration::from_secs(1),
    };
    let metrics_interval = match raw.metrics_interval {
        Some(t) => match humantime::parse_duration(&t) {
            Ok(d) if (Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&d) => d,
            _ => {
                problems.push(format!(
                    "[cloudwatch] metrics_interval = {t:?}: a duration from 1s to 1h"
                ));
                Duration::from_secs(60)
            }
        },
        None => Duration::from_secs(60),
    };
    let spool_dir = raw
        .spool_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR));
    if !spool_dir.is_absolute() {
        problems.push(format!(
            "[cloudwatch] spool_dir {:?} must be an absolute path",
            spool_dir
        ));
    }
    let spool_max_bytes = raw.spool_max_bytes.unwrap_or(1 << 30);
    if spool_max_bytes < 32 << 20 {
        problems.push(format!(
            "[cloudwatch] spool_max_bytes = {spool_max_bytes}: at least 33554432 (32 MiB)"
        ));
    }
    if problems.is_empty() {
        Ok(CloudWatch {
            log_group: raw.log_group,
            log_stream: raw.log_stream,
            region: raw.region,
            endpoint: raw.endpoint,
            flush_interval,
            spool_dir,
            spool_max_bytes,
            metrics_interval,
        })
    } else {
        Err(problems)
    }
}
