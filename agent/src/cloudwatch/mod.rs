//! Shipping the audit trail to CloudWatch Logs: the durable spool every record is appended to
//! (`spool`), the PutLogEvents batch rules (`batch`), and the sink that sends batches and
//! acknowledges them (`sink`).

pub mod batch;
pub mod sink;
pub mod spool;
