//! The broker's own latency floor, measured before the phases.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use paystream_processors::kafka;
use paystream_processors::settings::Settings;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::load::wait_for;
use crate::stats::{flight_times, joined_ms, p99_by_window, percentile_ms, FIVE_SECONDS_US};
use crate::BenchArgs;

/// The broker alone, with the producer and consumer settings the processors use: messages
/// produced at the latency phase's rate, timed to their ack and to their arrival at a
/// consumer, for as long as the latency phase (the development broker's cost grows with the
/// length of the log). End-to-end latency crosses the broker twice, so this is its floor.
pub(crate) async fn broker_floor(
    settings: &Settings,
    id: &str,
    args: &BenchArgs,
) -> anyhow::Result<BrokerFloor> {
    let mut settings = settings.clone();
    let name = format!("bench-{id}-0");
    settings.topics.order_events = format!("{name}.order.events");
    settings.topics.account_events = format!("{name}.account.events");
    settings.topics.dead_letter = format!("{name}.deadletter.events");
    kafka::create_topics(&settings).await?;
    let topic = settings.topics.order_events.clone();
    let consumer: StreamConsumer = kafka::consumer_config(&settings.kafka, &name).create()?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in 0..settings.kafka.partitions {
        assignment.add_partition_offset(&topic, partition, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    // The first second is a warm-up (producer id, connections, first fetches), not measured.
    let warmup = args.rate as usize;
    let events = warmup + (args.rate * args.seconds) as usize;
    let arrived: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; events]));
    let reader = {
        let arrived = arrived.clone();
        tokio::spawn(async move {
            let mut stream = consumer.stream();
            while let Some(Ok(message)) = stream.next().await {
                let now = Instant::now();
                let seq = message
                    .payload()
                    .and_then(|p| <[u8; 8]>::try_from(p).ok())
                    .map(|b| u64::from_be_bytes(b) as usize);
                if let (Some(seq), Ok(mut arrived)) = (seq, arrived.lock()) {
                    if let Some(slot) = arrived.get_mut(seq) {
                        slot.get_or_insert(now);
                    }
                }
            }
        })
    };
    let producer: FutureProducer =
        kafka::producer_config(&settings.kafka, Duration::from_secs(60)).create()?;
    let per_tick = (args.rate / 100).max(1);
    let mut interval =
        tokio::time::interval(Duration::from_secs_f64(per_tick as f64 / args.rate as f64));
    let mut sent = Vec::with_capacity(events);
    let mut acks = Vec::with_capacity(events);
    while sent.len() < events {
        interval.tick().await;
        for _ in 0..per_tick.min((events - sent.len()) as u64) {
            let seq = (sent.len() as u64).to_be_bytes();
            let key = (sent.len() % 1000).to_string();
            let at = Instant::now();
            let delivery = producer
                .send_result(FutureRecord::to(&topic).key(&key).payload(&seq[..]))
                .map_err(|(e, _)| e)
                .context("Failed to produce a probe message")?;
            sent.push(at);
            acks.push(tokio::spawn(async move {
                delivery
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|_| Instant::now())
            }));
        }
    }
    let acked: Vec<Option<Instant>> = futures::future::join_all(acks)
        .await
        .into_iter()
        .map(|a| a.ok().flatten())
        .collect();
    wait_for(
        Duration::from_secs(60),
        "every probe message to arrive",
        || async {
            arrived
                .lock()
                .map(|a| a.iter().all(Option::is_some))
                .unwrap_or(false)
        },
    )
    .await?;
    reader.abort();
    let arrived = arrived
        .lock()
        .map_err(|_| anyhow::anyhow!("probe lock poisoned"))?
        .clone();
    // Each message's (produced, ended) in microseconds since the first produce: the shape
    // the latency phase's flights have, so the same percentile and window functions apply.
    let micros = |at: Instant| at.saturating_duration_since(sent[0]).as_micros() as i64;
    let flights = |ends: &[Option<Instant>]| -> Vec<(i64, i64)> {
        sent[warmup..]
            .iter()
            .zip(&ends[warmup..])
            .filter_map(|(start, end)| Some((micros(*start), micros((*end)?))))
            .collect()
    };
    let trips = flights(&arrived);
    let (ack, trip) = (
        flight_times(flights(&acked).iter()),
        flight_times(trips.iter()),
    );
    let floor = BrokerFloor {
        p50_ms: percentile_ms(&trip, 0.5),
        p99_ms: percentile_ms(&trip, 0.99),
    };
    println!(
        "broker alone at {}/s: produce -> ack p50 {:.1} ms, p99 {:.1} ms; produce -> consumed p50 {:.1} ms, p99 {:.1} ms ({} messages)",
        args.rate,
        percentile_ms(&ack, 0.5),
        percentile_ms(&ack, 0.99),
        floor.p50_ms,
        floor.p99_ms,
        events - warmup
    );
    println!(
        "  produce -> consumed p99 in each 5 s: {} ms",
        joined_ms(&p99_by_window(&trips, FIVE_SECONDS_US))
    );
    Ok(floor)
}

/// The broker alone: produce -> consumed, one hop.
pub(crate) struct BrokerFloor {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}
