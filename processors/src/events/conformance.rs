//! The decoders against the JSON Schemas in `schemas/` (SPEC §2: the schemas are the
//! contract). A property test: each event type's valid example, and thousands of mutations of
//! it (fields removed, replaced by hostile values, added; the envelope replaced), go through
//! both the decoder and a JSON Schema validator.
//!
//! - Whatever the decoder accepts satisfies its schema: no record that fails its schema can
//!   move money.
//! - Whatever satisfies its schema the decoder accepts, except where the decoder is stricter
//!   on purpose: a number written with a fraction or exponent (`100.0`, `1e2`: money is an
//!   integer, SPEC §2) and integers outside i64, which JSON Schema's "integer" allows.
//! - Neither panics on anything.
//!
//! `PAYSTREAM_FUZZ_CASES` (mutations per event type, default 2,000) and `PAYSTREAM_FUZZ_SEED`
//! run longer campaigns: `scripts/fuzz.sh`.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::decode::{decode_envelope, AccountEvent, OrderEvent};
use crate::testing::{env_u64, has_lenient_integer, mutate, Rng};

const ORDER_TYPES: &[&str] = &["OrderCreated", "OrderPaid", "OrderCancelled"];
const ACCOUNT_TYPES: &[&str] = &[
    "AccountDebited",
    "AccountDebitFailed",
    "AccountRefunded",
    "AccountCredited",
];

fn example(event_type: &str) -> Value {
    let payload = match event_type {
        "OrderCreated" => json!({"orderId": 7, "orderNo": "ORD-7", "userId": 42, "amountFen": 300,
            "currency": "CNY", "items": [{"sku": "A", "qty": 1, "priceFen": 300}],
            "idempotencyKey": "k-7"}),
        "OrderPaid" => json!({"orderId": 7, "userId": 42, "amountFen": 300, "currency": "CNY"}),
        "OrderCancelled" => json!({"orderId": 7, "userId": 42, "reason": "USER_REQUESTED",
            "refundRequired": true}),
        "AccountDebited" => json!({"accountId": 3, "userId": 42, "orderId": 7, "deltaFen": -300,
            "balanceAfterFen": 700, "currency": "CNY"}),
        "AccountDebitFailed" => {
            json!({"userId": 42, "orderId": 7, "reason": "INSUFFICIENT_BALANCE",
            "amountFen": 300, "currency": "CNY"})
        }
        "AccountRefunded" => json!({"accountId": 3, "userId": 42, "orderId": 7, "deltaFen": 300,
            "balanceAfterFen": 1000, "currency": "CNY"}),
        "AccountCredited" => json!({"accountId": 3, "userId": 42, "deltaFen": 1000,
            "balanceAfterFen": 1000, "currency": "CNY", "reference": "top-up"}),
        other => panic!("no example for {other}"),
    };
    json!({"eventId": "0b6c1f2e-4d3a-4f5b-9c8d-7e6f5a4b3c2d", "eventType": event_type,
           "schemaVersion": 1, "occurredAt": "2026-01-01T00:00:00Z", "payload": payload})
}

fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas")
}

struct Contract {
    validators: Vec<(&'static str, jsonschema::Validator)>,
}

impl Contract {
    fn load() -> Self {
        let validators = ORDER_TYPES
            .iter()
            .chain(ACCOUNT_TYPES)
            .map(|&t| {
                let path = schema_dir().join(format!("{t}.v1.json"));
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let schema: Value = serde_json::from_str(&text).expect("schema is JSON");
                let validator = jsonschema::options()
                    .should_validate_formats(true)
                    .build(&schema)
                    .expect("schema compiles");
                (t, validator)
            })
            .collect();
        Self { validators }
    }

    /// Whether `event` satisfies the schema of the type it claims (no schema: no).
    fn valid(&self, event: &Value) -> bool {
        let claimed = event.get("eventType").and_then(Value::as_str);
        self.validators
            .iter()
            .find(|(t, _)| Some(*t) == claimed)
            .is_some_and(|(_, v)| v.is_valid(event))
    }
}

/// Whether the decoder of `topic_types`' topic accepts `bytes` as an event.
fn accepted(topic_types: &[&str], bytes: &[u8]) -> bool {
    let Ok(raw) = decode_envelope(Some(bytes), 1 << 20) else {
        return false;
    };
    if topic_types == ORDER_TYPES {
        OrderEvent::decode(&raw).is_ok()
    } else {
        AccountEvent::decode(&raw).is_ok()
    }
}

#[test]
fn every_event_the_decoders_accept_satisfies_its_schema_and_every_valid_one_is_accepted() {
    let contract = Contract::load();
    let cases = env_u64("PAYSTREAM_FUZZ_CASES", 2_000);
    let seed = env_u64("PAYSTREAM_FUZZ_SEED", 0x5eed);
    let mut rng = Rng(seed);
    let mut outcomes = [0_u64; 2];
    for (topic, types) in [("order", ORDER_TYPES), ("account", ACCOUNT_TYPES)] {
        for &event_type in types {
            let valid = example(event_type);
            assert!(contract.valid(&valid), "{event_type}'s example: {valid}");
            assert!(accepted(types, valid.to_string().as_bytes()), "{valid}");
            for case in 0..cases {
                let mut event = valid.clone();
                for _ in 0..=rng.below(3) {
                    mutate(&mut event, &mut rng);
                }
                let bytes = event.to_string();
                let by_decoder = accepted(types, bytes.as_bytes());
                let by_schema = contract.valid(&event);
                outcomes[usize::from(by_decoder)] += 1;
                let why = format!("{topic} topic, {event_type} case {case} (seed {seed}): {bytes}");
                assert!(
                    !by_decoder || by_schema,
                    "accepted but fails its schema: {why}"
                );
                let ours = event
                    .get("eventType")
                    .and_then(Value::as_str)
                    .is_some_and(|t| types.contains(&t));
                if by_schema && ours && !has_lenient_integer(&event) {
                    assert!(by_decoder, "satisfies its schema but refused: {why}");
                }
            }
        }
    }
    // The campaign reached both sides of the line.
    assert!(
        outcomes.iter().all(|&n| n > cases / 10),
        "refused / accepted: {outcomes:?}"
    );
}

#[test]
fn hostile_bytes_are_refused_without_a_panic_or_a_runaway_allocation() {
    let deep_array = "[".repeat(100_000);
    let deep_object = "{\"a\":".repeat(100_000);
    let huge_number = format!("{{\"eventId\": 1{}}}", "0".repeat(100_000));
    let mut rng = Rng(env_u64("PAYSTREAM_FUZZ_SEED", 0x5eed));
    let random: Vec<Vec<u8>> = (0..env_u64("PAYSTREAM_FUZZ_CASES", 2_000))
        .map(|_| {
            let len = rng.below(64);
            (0..len).map(|_| rng.next() as u8).collect()
        })
        .collect();
    let mut inputs: Vec<Vec<u8>> = vec![
        deep_array.into_bytes(),
        deep_object.into_bytes(),
        huge_number.into_bytes(),
        b"\xff\xfe".to_vec(),
        b"null".to_vec(),
        vec![0; 1 << 20],
    ];
    inputs.extend(random);
    for bytes in inputs {
        for types in [ORDER_TYPES, ACCOUNT_TYPES] {
            assert!(
                !accepted(types, &bytes),
                "{:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }
    // Just past the byte limit: refused before it is parsed.
    let over = vec![b' '; (1 << 20) + 1];
    assert!(decode_envelope(Some(&over), 1 << 20).is_err());
}
