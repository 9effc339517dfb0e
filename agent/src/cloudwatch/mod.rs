//! Shipping the audit trail to CloudWatch Logs: the durable spool every record is appended to
//! (`spool`), the PutLogEvents batch rules (`batch`), and the sink that sends batches and
//! acknowledges them (`sink`; `health` is what status shows of it), and the metrics written into the same stream (`metrics`, the
//! Embedded Metric Format).

pub mod batch;
pub mod health;
pub mod metrics;
#[cfg(feature = "cloudwatch")]
pub mod sink;
pub mod spool;
