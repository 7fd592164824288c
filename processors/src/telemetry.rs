//! Logs (tracing) and metrics (Prometheus), set up in one place. Metric names follow one
//! prefix, base units and bounded labels: never a user, order, account or event id.

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing_subscriber::{fmt, EnvFilter};

use crate::settings::{LogFormat, LogSettings};

/// Installs the global tracing subscriber. `RUST_LOG` wins over the configured level.
pub fn init_logging(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},rdkafka=warn,sqlx=warn", settings.level)));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

pub struct Metrics {
    pub registry: Registry,
    pub events_consumed: IntCounterVec,
    pub batch_size: HistogramVec,
    pub batch_partitions: HistogramVec,
    pub batch_duration: HistogramVec,
    pub consume_delay: HistogramVec,
    pub retries: IntCounterVec,
    pub fenced_commits: IntCounterVec,
    pub consumer_rejoins: IntCounterVec,
    pub offset_jumps: IntCounterVec,
    pub dedupe_pruned: IntCounterVec,
    pub relay_published: IntCounterVec,
    pub relay_round_rows: Histogram,
    pub relay_errors: IntCounterVec,
    pub relay_standby_rounds: IntCounter,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub idempotency: IntCounterVec,
    pub idempotency_keys_expired: IntCounter,
    pub orders_timed_out: IntCounterVec,
    pub outbox_backlog: IntGauge,
    pub outbox_parked: IntGauge,
    pub outbox_pruned: IntCounter,
    pub outbox_oldest_age: Gauge,
    pub orders_pending: IntGauge,
    pub oldest_pending_order_age: Gauge,
    pub assigned_partitions: IntGaugeVec,
    pub partitions_held: IntGaugeVec,
    pub partitions_orphaned: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
    pub audit_violations: IntGauge,
    pub orders_by_status: IntGaugeVec,
    pub audit_last_run: Gauge,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        // Every metric is built from constant, valid names and registered once.
        let register = |metric: Box<dyn prometheus::core::Collector>| {
            registry.register(metric).expect("unique metric")
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(c.clone()));
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            register(Box::new(h.clone()));
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = Gauge::new(name, help).expect("valid metric");
            register(Box::new(g.clone()));
            g
        };
        let int_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            register(Box::new(c.clone()));
            c
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            register(Box::new(g.clone()));
            g
        };
        let int_gauges = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(g.clone()));
            g
        };
        let seconds = || exponential_buckets(0.001, 2.0, 14).expect("valid buckets");
        Self {
            events_consumed: counter(
                "paystream_events_consumed_total",
                "Messages consumed, by processor, topic and outcome \
                 (applied, duplicate, business_failure, dead_lettered, ignored).",
                &["processor", "topic", "outcome"],
            ),
            batch_size: histogram(
                "paystream_batch_size",
                "Messages per batch transaction (all of its partitions).",
                &["processor"],
                exponential_buckets(1.0, 2.0, 12).expect("valid buckets"),
            ),
            batch_partitions: histogram(
                "paystream_batch_partitions",
                "Partitions committed together in one batch transaction (processor.group_commit).",
                &["processor"],
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0],
            ),
            batch_duration: histogram(
                "paystream_batch_transaction_duration_seconds",
                "Wall time of one batch transaction, commit included.",
                &["processor"],
                seconds(),
            ),
            consume_delay: histogram(
                "paystream_consume_delay_seconds",
                "Time from a message's timestamp (its producer's create time) to the worker \
                 polling it: the broker hop plus any wait in the worker's fetch queue.",
                &["processor"],
                seconds(),
            ),
            retries: counter(
                "paystream_retries_total",
                "Retried batch transactions, by processor and error class.",
                &["processor", "error_class"],
            ),
            consumer_rejoins: counter(
                "paystream_consumer_rejoins_total",
                "Times a worker left and rejoined its consumer group because a partition was held \
                 by no live worker for a session timeout (the group coordinator left it unassigned).",
                &["processor"],
            ),
            fenced_commits: counter(
                "paystream_fenced_commits_total",
                "Commits refused because this worker no longer owns the partition (zombie).",
                &["processor"],
            ),
            offset_jumps: counter(
                "paystream_offset_jumps_total",
                "Fetches of a live partition that skipped offsets, by cause: deleted (retention removed messages never applied), not_in_log (transaction markers, compaction), unknown.",
                &["processor", "cause"],
            ),
            dedupe_pruned: counter(
                "paystream_dedupe_pruned_total",
                "Applied event ids deleted from the dedupe table past their retention, by processor.",
                &["processor"],
            ),
            relay_published: counter(
                "paystream_relay_published_total",
                "Outbox rows published by the relay, by topic.",
                &["topic"],
            ),
            relay_round_rows: {
                let opts = HistogramOpts::new(
                    "paystream_relay_round_rows",
                    "Outbox rows published per relay round (one transaction, one wake-up).",
                )
                .buckets(exponential_buckets(1.0, 2.0, 12).expect("valid buckets"));
                let h = Histogram::with_opts(opts).expect("valid metric");
                register(Box::new(h.clone()));
                h
            },
            relay_errors: counter(
                "paystream_relay_errors_total",
                "Relay failures, by stage: publish (a batch that failed and will be retried), \
                 parked (a row the broker refused for good).",
                &["stage"],
            ),
            relay_standby_rounds: int_counter(
                "paystream_relay_standby_rounds_total",
                "Relay rounds that found another relay holding the relay lock and published \
                 nothing (a standby relay counts up; with a single relay it stays 0).",
            ),
            http_requests: counter(
                "paystream_http_requests_total",
                "HTTP requests served, by method, route template and status code.",
                &["method", "route", "status"],
            ),
            http_duration: histogram(
                "paystream_http_request_duration_seconds",
                "HTTP request latency, by method and route template.",
                &["method", "route"],
                seconds(),
            ),
            idempotency: counter(
                "paystream_idempotency_total",
                "Requests with an Idempotency-Key that were not fresh, by result \
                 (replayed, reused_with_other_request, in_flight).",
                &["result"],
            ),
            idempotency_keys_expired: int_counter(
                "paystream_idempotency_keys_expired_total",
                "Idempotency keys deleted past their expiry (api.idempotency_retention_hours).",
            ),
            orders_timed_out: counter(
                "paystream_orders_timed_out_total",
                "Orders cancelled by the payment timeout sweeper.",
                &["reason"],
            ),
            outbox_backlog: int_gauge(
                "paystream_outbox_backlog",
                "Outbox rows not yet published (discarded ones not counted).",
            ),
            outbox_parked: int_gauge(
                "paystream_outbox_parked",
                "Outbox rows the broker refused for good, parked: the later rows of their topic \
                 and key wait behind them (`paystream outbox parked`).",
            ),
            outbox_pruned: int_counter(
                "paystream_outbox_pruned_total",
                "Records of published outbox rows (outbox_published) deleted past relay.retention_hours.",
            ),
            outbox_oldest_age: gauge(
                "paystream_outbox_oldest_unpublished_age_seconds",
                "Age of the oldest unpublished outbox row (0 when none).",
            ),
            orders_pending: int_gauge("paystream_orders_pending", "Orders in state PENDING."),
            oldest_pending_order_age: gauge(
                "paystream_oldest_pending_order_age_seconds",
                "Age of the oldest PENDING order (0 when none).",
            ),
            assigned_partitions: int_gauges(
                "paystream_assigned_partitions",
                "Partitions this worker holds, by processor.",
                &["processor"],
            ),
            partitions_held: int_gauges(
                "paystream_partitions_held",
                "Assigned partitions held because the log does not continue the stored offset (a topic recreated under the database), by processor.",
                &["processor"],
            ),
            partitions_orphaned: int_gauges(
                "paystream_partitions_orphaned",
                "Partitions of the processor's topic that no live worker says it holds (the workers' \
                 records in PostgreSQL), as this worker saw at its last heartbeat. Brief during a \
                 rebalance; lasting, their events wait.",
                &["processor"],
            ),
            consumer_lag: int_gauges(
                "paystream_consumer_lag_messages",
                "Messages between the stored offset and the partition's high watermark, by processor and partition.",
                &["processor", "partition"],
            ),
            orders_by_status: int_gauges(
                "paystream_orders",
                "Orders by status, counted by the periodic audit (a full count is too costly per scrape).",
                &["status"],
            ),
            audit_violations: int_gauge("paystream_audit_violations", "Violations found by the last periodic audit."),
            audit_last_run: gauge(
                "paystream_audit_last_run_timestamp_seconds",
                "Unix time of the last completed periodic audit.",
            ),
            registry,
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The cumulative bucket counts `(upper bound, count)` of one histogram series, for reading a
/// histogram in-process (the benchmark) the way Prometheus would.
pub fn bucket_counts(histogram: &HistogramVec, labels: &[&str]) -> Vec<(f64, u64)> {
    use prometheus::core::Metric;
    histogram
        .with_label_values(labels)
        .metric()
        .get_histogram()
        .get_bucket()
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count()))
        .collect()
}

/// The upper bound of the bucket holding quantile `q` of what was observed between two
/// snapshots of [`bucket_counts`]: a conservative estimate, as coarse as the buckets.
pub fn bucket_quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, u64)> = after
        .iter()
        .zip(before.iter().map(|(_, c)| *c).chain(std::iter::repeat(0)))
        .map(|((bound, now), then)| (*bound, now.saturating_sub(then)))
        .collect();
    let total = counts.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = (total as f64 * q).ceil() as u64;
    counts
        .iter()
        .find(|(_, c)| *c >= rank)
        .map(|(bound, _)| *bound)
        .or(Some(f64::INFINITY))
}
