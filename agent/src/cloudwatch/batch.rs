//! PutLogEvents batches, within every rule of the API, enforced here (the test server does
//! not): at most 10,000 events and 1,048,576 bytes (each event's UTF-8 message plus 26 bytes),
//! events in time order, one batch spanning at most 24 hours, and no event over 256 KiB
//! (longer ones are cut, with a marker saying so).

/// Per-event overhead CloudWatch counts against the batch size.
pub const EVENT_OVERHEAD: usize = 26;
pub const MAX_BATCH_BYTES: usize = 1_048_576;
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// The largest event: 256 KiB including the overhead.
pub const MAX_EVENT_BYTES: usize = 262_144 - EVENT_OVERHEAD;
pub const MAX_SPAN_MS: i64 = 24 * 3600 * 1000;
/// Appended to a message that was cut to fit.
pub const TRUNCATED_MARKER: &str = "…[truncated by egress-guard]";

/// One log event: milliseconds since the epoch and the message (one JSON record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub timestamp_ms: i64,
    pub message: String,
}

impl Event {
    /// Cuts an oversized message at a character boundary and marks it.
    pub fn fit(mut self) -> Self {
        if self.message.len() > MAX_EVENT_BYTES {
            let mut end = MAX_EVENT_BYTES - TRUNCATED_MARKER.len();
            while !self.message.is_char_boundary(end) {
                end -= 1;
            }
            self.message.truncate(end);
            self.message.push_str(TRUNCATED_MARKER);
        }
        self
    }

    pub fn cost(&self) -> usize {
        self.message.len() + EVENT_OVERHEAD
    }
}

/// The time of a record: its top-level `ts` field (RFC 3339) in milliseconds since the epoch,
/// if it has one. Only that field is decoded; the others are skipped, not built into a tree.
pub fn record_time_ms(record: &str) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Ts<'a> {
        #[serde(borrow)]
        ts: Option<std::borrow::Cow<'a, str>>,
    }
    let ts = serde_json::from_str::<Ts>(record).ok()?.ts?;
    humantime::parse_rfc3339(&ts)
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as i64)
}

/// The timestamp of a record: its `ts` field (RFC 3339), else `fallback_ms`.
pub fn timestamp_of(record: &str, fallback_ms: i64) -> i64 {
    record_time_ms(record).unwrap_or(fallback_ms)
}

/// A batch being built: its events, their bytes as CloudWatch counts them, and their time
/// span, kept up to date as events join, so that whether the next one fits is decided in O(1).
#[derive(Debug, Default)]
pub struct Batch {
    events: Vec<Event>,
    bytes: usize,
    /// The earliest and the latest timestamp in the batch.
    span: Option<(i64, i64)>,
}

impl Batch {
    /// Whether `next` can join without breaking a rule.
    pub fn fits(&self, next: &Event) -> bool {
        if self.events.len() >= MAX_BATCH_EVENTS || self.bytes + next.cost() > MAX_BATCH_BYTES {
            return false;
        }
        let t = next.timestamp_ms;
        let (lo, hi) = self.span.unwrap_or((t, t));
        hi.max(t) - lo.min(t) <= MAX_SPAN_MS
    }

    /// Adds `e` (check `fits` first).
    pub fn push(&mut self, e: Event) {
        let t = e.timestamp_ms;
        self.span = Some(self.span.map_or((t, t), |(lo, hi)| (lo.min(t), hi.max(t))));
        self.bytes += e.cost();
        self.events.push(e);
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The events, in time order.
    pub fn into_events(mut self) -> Vec<Event> {
        order(&mut self.events);
        self.events
    }
}

/// Puts a batch in time order (stable: equal times keep their order).
pub fn order(events: &mut [Event]) {
    events.sort_by_key(|e| e.timestamp_ms);
}

/// Checks a batch against every rule; the tests use it on what was sent.
pub fn check(events: &[Event]) -> Result<(), String> {
    if events.is_empty() {
        return Err("empty batch".into());
    }
    if events.len() > MAX_BATCH_EVENTS {
        return Err(format!("{} events", events.len()));
    }
    let bytes: usize = events.iter().map(Event::cost).sum();
    if bytes > MAX_BATCH_BYTES {
        return Err(format!("{bytes} bytes"));
    }
    if let Some(e) = events.iter().find(|e| e.message.len() > MAX_EVENT_BYTES) {
        return Err(format!("an event of {} bytes", e.message.len()));
    }
    if events
        .windows(2)
        .any(|w| w[0].timestamp_ms > w[1].timestamp_ms)
    {
        return Err("events out of time order".into());
    }
    let span = events[events.len() - 1].timestamp_ms - events[0].timestamp_ms;
    if span > MAX_SPAN_MS {
        return Err(format!("a span of {span} ms"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts: i64, len: usize) -> Event {
        Event {
            timestamp_ms: ts,
            message: "x".repeat(len),
        }
    }

    #[test]
    fn oversized_events_are_cut_with_a_marker() {
        let e = Event {
            timestamp_ms: 1,
            message: "é".repeat(MAX_EVENT_BYTES),
        }
        .fit();
        assert!(e.message.len() <= MAX_EVENT_BYTES);
        assert!(e.message.ends_with(TRUNCATED_MARKER));
        let small = ev(1, 10).fit();
        assert_eq!(small.message.len(), 10);
    }

    /// Fills a batch with copies of `e` until the next one would not fit.
    fn fill(e: &Event) -> Batch {
        let mut batch = Batch::default();
        while batch.fits(e) {
            batch.push(e.clone());
        }
        batch
    }

    #[test]
    fn batches_respect_count_size_and_span() {
        assert_eq!(
            fill(&ev(0, 50)).len(),
            MAX_BATCH_EVENTS,
            "count bound first for small events"
        );
        assert_eq!(
            fill(&ev(0, 100)).len(),
            MAX_BATCH_BYTES / 126,
            "then the byte bound"
        );
        let batch = fill(&ev(0, 200_000));
        assert_eq!(batch.len(), 5, "size bound: 5 × 200,026 bytes ≤ 1 MiB");
        assert!(check(&batch.into_events()).is_ok());
        let mut one = Batch::default();
        one.push(ev(0, 1));
        assert!(!one.fits(&ev(MAX_SPAN_MS + 1, 1)));
        assert!(one.fits(&ev(MAX_SPAN_MS, 1)));
        // The span runs from the earliest to the latest event, whatever order they came in.
        let mut b = Batch::default();
        b.push(ev(10, 1));
        b.push(ev(5, 1));
        assert!(b.fits(&ev(5 + MAX_SPAN_MS, 1)));
        assert!(!b.fits(&ev(6 + MAX_SPAN_MS, 1)));
        assert!(b.fits(&ev(10 - MAX_SPAN_MS, 1)));
        assert!(!b.fits(&ev(9 - MAX_SPAN_MS, 1)));
        let times: Vec<i64> = b.into_events().iter().map(|e| e.timestamp_ms).collect();
        assert_eq!(times, [5, 10], "in time order");
    }

    #[test]
    fn check_finds_every_broken_rule() {
        assert!(check(&[ev(2, 1), ev(1, 1)]).is_err());
        assert!(check(&[ev(0, 1), ev(MAX_SPAN_MS + 1, 1)]).is_err());
        assert!(check(&[ev(0, MAX_EVENT_BYTES + 1)]).is_err());
        let mut v = vec![ev(3, 1), ev(1, 1), ev(2, 1)];
        order(&mut v);
        assert!(check(&v).is_ok());
    }

    #[test]
    fn timestamps_come_from_the_record() {
        let r = r#"{"version":1,"ts":"2026-11-22T04:44:34.526190885Z","type":"x"}"#;
        assert_eq!(timestamp_of(r, 7), 1_795_322_674_526);
        assert_eq!(timestamp_of("not json", 7), 7);
        // Only the top-level `ts` counts, escapes and all; a record without one has none.
        let nested = r#"{"_aws":{"ts":"2000-01-01T00:00:00Z"},"ts":"2026-11-22T04:44:34.526Z"}"#;
        assert_eq!(record_time_ms(nested), Some(1_795_322_674_526));
        let escaped = r#"{"ts":"2026-11-22T04:44:34.526\u005a"}"#;
        assert_eq!(record_time_ms(escaped), Some(1_795_322_674_526));
        assert_eq!(record_time_ms(r#"{"type":"x"}"#), None);
        assert_eq!(record_time_ms(r#"{"ts":5}"#), None);
    }
}
