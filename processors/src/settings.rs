//! Configuration: the committed defaults (`config/default.toml`, compiled in), an optional
//! file, then `PAYSTREAM__*` environment variables, each layer overriding the one before.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

const DEFAULTS: &str = include_str!("../../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    pub topics: TopicSettings,
    pub processor: ProcessorSettings,
    pub relay: RelaySettings,
    pub orders: OrderSettings,
    pub api: ApiSettings,
    pub audit: AuditSettings,
    pub dlq: DlqSettings,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
    pub connect_timeout_ms: u64,
    /// The longest a statement may run (0: no limit). Above the longest legitimate one; the
    /// audit, a legitimate long reader, lifts it for its own transaction.
    pub statement_timeout_ms: u64,
    /// The longest a statement may wait for a lock (0: no limit); the wait then fails as a
    /// transient error and is retried.
    pub lock_timeout_ms: u64,
    /// How long a session may sit idle inside a transaction before the server ends it and
    /// releases its locks (0: no limit): a frozen or partitioned worker's locks are freed
    /// after this. Above the relay's `delivery_timeout_ms`, which a round waits inside its
    /// transaction.
    pub idle_in_transaction_timeout_ms: u64,
    /// TCP keepalive idle time, in seconds, of the server's side of each connection (0: the
    /// server's default): a dead client host is noticed after about this plus
    /// `tcp_keepalive_interval_s` × `tcp_keepalive_count`, instead of the kernel's two hours.
    pub tcp_keepalive_idle_s: u64,
    pub tcp_keepalive_interval_s: u64,
    pub tcp_keepalive_count: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KafkaSettings {
    pub brokers: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub message_max_bytes: usize,
    pub session_timeout_ms: u64,
    /// Most kilobytes the Kafka client prefetches per consumer (`queued.max.messages.kbytes`);
    /// at least twice `message_max_bytes`.
    pub fetch_queue_max_kbytes: usize,
    pub fetch_wait_max_ms: u64,
    pub linger_ms: u64,
    pub max_poll_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TopicSettings {
    pub order_events: String,
    pub account_events: String,
    pub dead_letter: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProcessorSettings {
    pub account_group: String,
    pub batch_max: usize,
    /// Most bytes (keys, values, headers) of one partition's batch; a batch holds at least
    /// one message whatever its size.
    pub batch_max_bytes: usize,
    /// Most bytes of fetched messages waiting in a worker's queues before fetching pauses.
    pub queue_max_bytes: usize,
    pub batch_linger_ms: u64,
    pub group_commit: bool,
    pub max_event_bytes: usize,
    pub settlement_shards: i32,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub stall_before_commit_ms: u64,
    pub dedupe_retention_hours: u64,
    pub dedupe_prune_interval_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RelaySettings {
    pub batch_max: i64,
    /// Most payload bytes one relay round reads and sends; a round takes at least one row.
    pub round_max_bytes: i64,
    /// A parked outbox row (refused by the broker for good) is tried again this long after.
    pub park_retry_s: u64,
    /// The relay lease's time to live: a relay that died or froze is replaced this long after
    /// its last round.
    pub lease_ms: u64,
    pub poll_interval_ms: u64,
    pub retention_hours: u64,
    pub prune_interval_s: u64,
    pub delivery_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OrderSettings {
    pub group: String,
    pub payment_timeout_s: u64,
    pub sweep_interval_ms: u64,
    pub sweep_batch: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiSettings {
    pub listen: String,
    pub public_url: String,
    pub jwt_secret: String,
    /// Accepts a published development key (`DEVELOPMENT_KEYS`): a laptop, never production.
    #[serde(default)]
    pub development: bool,
    pub max_body_bytes: usize,
    pub request_timeout_ms: u64,
    pub rate_limit_per_s: f64,
    pub rate_limit_burst: f64,
    pub idempotency_retention_hours: u64,
    pub currencies: Vec<String>,
    pub max_order_amount_fen: i64,
    pub max_deposit_amount_fen: i64,
    pub max_items: usize,
    pub page_max: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuditSettings {
    pub interval_s: u64,
    pub settle_s: u64,
    pub outbox_max_age_s: u64,
    /// A consumer group whose stored offset has not moved for this long while messages wait
    /// is reported by `paystream audit` (0: not checked).
    pub stall_after_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DlqSettings {
    pub max_attempts: u32,
    pub replay_rate_per_s: f64,
    pub read_idle_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MetricsSettings {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

impl Settings {
    /// Loads the layered configuration. `file` is an optional extra TOML file.
    pub fn load(file: Option<&Path>) -> Result<Self, config::ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("PAYSTREAM")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("api.currencies"),
            )
            .build()?
            .try_deserialize()?;
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> Result<(), config::ConfigError> {
        let bad = |msg: &str| Err(config::ConfigError::Message(msg.to_owned()));
        if self.processor.batch_max == 0 {
            return bad("processor.batch_max must be at least 1");
        }
        if self.processor.settlement_shards < 1 {
            return bad("processor.settlement_shards must be at least 1");
        }
        if self.kafka.partitions < 1 {
            return bad("kafka.partitions must be at least 1");
        }
        if self.relay.batch_max < 1 {
            return bad("relay.batch_max must be at least 1");
        }
        if self.api.jwt_secret.len() < 16 {
            return bad("api.jwt_secret must be at least 16 bytes");
        }
        if self
            .api
            .currencies
            .iter()
            .any(|c| crate::domain::Currency::parse(c).is_none())
        {
            return bad("api.currencies must be ISO 4217 codes such as \"CNY\"");
        }
        if self.api.rate_limit_per_s <= 0.0 || self.api.rate_limit_burst < 1.0 {
            return bad(
                "api.rate_limit_per_s must be positive and api.rate_limit_burst at least 1",
            );
        }
        if self.orders.sweep_batch < 1 || self.api.page_max < 1 {
            return bad("orders.sweep_batch and api.page_max must be at least 1");
        }
        Ok(())
    }
}

/// Signing keys published with paystream (the committed default, the placeholders of
/// `docker-compose.yml` and the k8s example): anyone can mint tokens with them, admin ones
/// included.
pub const DEVELOPMENT_KEYS: &[&str] = &[
    "paystream-dev-secret-do-not-use-in-production",
    "change-me-change-me-change-me",
    "CHANGE-ME-at-least-16-bytes",
];

impl ApiSettings {
    /// Whether the API may serve with this signing key: any key in development mode, only a
    /// key of the operator's own otherwise.
    pub fn check_signing_key(&self) -> anyhow::Result<()> {
        if self.development || !DEVELOPMENT_KEYS.contains(&self.jwt_secret.as_str()) {
            return Ok(());
        }
        anyhow::bail!(
            "api.jwt_secret is a published development key, so anyone could mint tokens (admin \
             ones too): set PAYSTREAM__API__JWT_SECRET to a secret of your own (for example \
             `openssl rand -hex 32`), or PAYSTREAM__API__DEVELOPMENT=true on a laptop"
        )
    }
}

impl ProcessorSettings {
    pub fn batch_linger(&self) -> Duration {
        Duration::from_millis(self.batch_linger_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_defaults_parse_and_pass_checks() {
        let settings = Settings::load(None).expect("defaults load");
        assert_eq!(settings.topics.order_events, "order.events");
        assert_eq!(settings.log.format, LogFormat::Human);
    }
}
