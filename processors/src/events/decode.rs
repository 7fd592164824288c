//! Decoding: the envelope of a message value, then its payload as the event type and version
//! it claims, or the poison class that says why it is not an event (SPEC §3).

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{DebitFailure, OrderCancelled, OrderCreated, OrderItem, OrderPaid};
use crate::domain::{Amount, Currency};

/// Why a message can never be processed, whatever we retry. Each lands on the dead-letter
/// topic with this class in its `x-dlq-error-class` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoisonClass {
    Empty,
    TooLarge,
    InvalidUtf8,
    NotJson,
    SchemaViolation,
    UnknownEventType,
    UnsupportedSchemaVersion,
    InvalidAmount,
    BalanceOverflow,
    /// A header name that is not UTF-8: the record cannot be read whole.
    UnreadableHeaders,
}

impl PoisonClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "EMPTY",
            Self::TooLarge => "TOO_LARGE",
            Self::InvalidUtf8 => "INVALID_UTF8",
            Self::NotJson => "NOT_JSON",
            Self::SchemaViolation => "SCHEMA_VIOLATION",
            Self::UnknownEventType => "UNKNOWN_EVENT_TYPE",
            Self::UnsupportedSchemaVersion => "UNSUPPORTED_SCHEMA_VERSION",
            Self::InvalidAmount => "INVALID_AMOUNT",
            Self::BalanceOverflow => "BALANCE_OVERFLOW",
            Self::UnreadableHeaders => "UNREADABLE_HEADERS",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", class.as_str())]
pub struct Poison {
    pub class: PoisonClass,
    pub message: String,
}

impl Poison {
    pub fn new(class: PoisonClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }
}

/// The envelope with its payload still undecoded.
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub occurred_at: DateTime<Utc>,
    pub payload: Value,
}

/// The envelope's fields, taken out of the parsed object one by one (no second pass over the
/// payload), each mismatch a `SchemaViolation` naming the field. What the schemas require
/// beyond the field types: a JSON object (not an array filled by position), and an `eventId`
/// in the schema's pattern, the hyphenated form (the UUID parser also takes the simple, braced
/// and URN forms, which the schema refuses). Fields the envelope does not know are ignored.
fn take_envelope(value: Value) -> Result<RawEvent, Poison> {
    let violation =
        |what: &str| Poison::new(PoisonClass::SchemaViolation, format!("envelope: {what}"));
    let Value::Object(mut envelope) = value else {
        return Err(violation("must be a JSON object"));
    };
    let event_id = match envelope.get("eventId").and_then(Value::as_str) {
        Some(id) if is_hyphenated_uuid(id) => Uuid::parse_str(id)
            .map_err(|e| violation(&format!("eventId {id:?} is not a UUID: {e}")))?,
        Some(id) => {
            return Err(violation(&format!(
            "eventId {id:?} is not a UUID in its hyphenated form (8-4-4-4-12 hexadecimal digits)"
        )))
        }
        None => return Err(violation("eventId must be a string")),
    };
    let event_type = match envelope.remove("eventType") {
        Some(Value::String(event_type)) => event_type,
        _ => return Err(violation("eventType must be a string")),
    };
    let schema_version = envelope
        .get("schemaVersion")
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| violation("schemaVersion must be an integer in 0..=4294967295"))?;
    let occurred_at = envelope
        .get("occurredAt")
        .and_then(Value::as_str)
        .and_then(|at| at.parse::<DateTime<Utc>>().ok())
        .ok_or_else(|| violation("occurredAt must be an RFC 3339 date-time string"))?;
    let payload = match envelope.remove("payload") {
        Some(payload @ Value::Object(_)) => payload,
        _ => return Err(violation("payload must be a JSON object")),
    };
    Ok(RawEvent {
        event_id,
        event_type,
        schema_version,
        occurred_at,
        payload,
    })
}

/// `^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`
fn is_hyphenated_uuid(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Reads the envelope of a message value, or says which class of poison it is.
pub fn decode_envelope(value: Option<&[u8]>, max_bytes: usize) -> Result<RawEvent, Poison> {
    let bytes = match value {
        None | Some([]) => return Err(Poison::new(PoisonClass::Empty, "message has no value")),
        Some(bytes) => bytes,
    };
    if bytes.len() > max_bytes {
        return Err(Poison::new(
            PoisonClass::TooLarge,
            format!("value is {} bytes, the limit is {max_bytes}", bytes.len()),
        ));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Poison::new(PoisonClass::InvalidUtf8, format!("value is not UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Poison::new(PoisonClass::NotJson, format!("envelope: {e}")))?;
    take_envelope(value)
}

/// The events the account processor reads from `order.events`.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderEvent {
    Created(OrderCreated),
    Paid(OrderPaid),
    Cancelled(OrderCancelled),
}

impl OrderEvent {
    pub fn decode(raw: &RawEvent) -> Result<Self, Poison> {
        let p = Payload(&raw.payload);
        match (raw.event_type.as_str(), raw.schema_version) {
            ("OrderCreated", 1) => Ok(Self::Created(OrderCreated {
                order_id: p.id("orderId")?,
                order_no: p.string("orderNo", 64)?,
                user_id: p.id("userId")?,
                amount_fen: p.amount("amountFen")?,
                currency: p.currency("currency")?,
                items: p.items("items")?,
                idempotency_key: p.string("idempotencyKey", 255)?,
            })),
            ("OrderPaid", 1) => Ok(Self::Paid(OrderPaid {
                order_id: p.id("orderId")?,
                user_id: p.id("userId")?,
                amount_fen: p.amount("amountFen")?,
                currency: p.currency("currency")?,
            })),
            ("OrderCancelled", 1) => Ok(Self::Cancelled(OrderCancelled {
                order_id: p.id("orderId")?,
                user_id: p.id("userId")?,
                reason: p.string("reason", 255)?,
                refund_required: p.boolean("refundRequired")?,
            })),
            ("OrderCreated" | "OrderPaid" | "OrderCancelled", v) => Err(Poison::new(
                PoisonClass::UnsupportedSchemaVersion,
                format!("{} schemaVersion {v} is not supported", raw.event_type),
            )),
            (other, _) => Err(Poison::new(
                PoisonClass::UnknownEventType,
                format!("unknown eventType {other:?} on the order topic"),
            )),
        }
    }
}

/// What the order processor needs of the events on `account.events`. `AccountCredited`
/// (deposits) is part of the topic but not of the saga.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountEvent {
    Debited {
        order_id: i64,
        user_id: i64,
        delta_fen: i64,
    },
    DebitFailed {
        order_id: i64,
        user_id: i64,
        reason: DebitFailure,
    },
    Refunded {
        order_id: i64,
        user_id: i64,
        delta_fen: i64,
    },
    Credited,
}

impl AccountEvent {
    pub fn decode(raw: &RawEvent) -> Result<Self, Poison> {
        let p = Payload(&raw.payload);
        match (raw.event_type.as_str(), raw.schema_version) {
            ("AccountDebited", 1) => {
                let delta_fen = p.integer("deltaFen")?;
                if !(-i64::MAX..=-1).contains(&delta_fen) {
                    return Err(Poison::new(
                        PoisonClass::InvalidAmount,
                        "deltaFen of a debit must be negative (and not below -9223372036854775807)",
                    ));
                }
                p.id("accountId")?;
                p.balance("balanceAfterFen")?;
                p.currency("currency")?;
                Ok(Self::Debited {
                    order_id: p.id("orderId")?,
                    user_id: p.id("userId")?,
                    delta_fen,
                })
            }
            ("AccountDebitFailed", 1) => {
                let reason = p.field("reason")?.as_str().and_then(DebitFailure::parse).ok_or_else(|| {
                    Payload::violation("reason", "one of INSUFFICIENT_BALANCE, ACCOUNT_NOT_FOUND, CURRENCY_MISMATCH, ACCOUNT_FROZEN, ORDER_NOT_FOUND, ORDER_MISMATCH")
                })?;
                // Optional, but what is there must hold.
                if p.0.get("amountFen").is_some() {
                    p.amount("amountFen")?;
                }
                if p.0.get("currency").is_some() {
                    p.currency("currency")?;
                }
                Ok(Self::DebitFailed {
                    order_id: p.id("orderId")?,
                    user_id: p.id("userId")?,
                    reason,
                })
            }
            ("AccountRefunded", 1) => {
                let delta_fen = p.amount("deltaFen")?.fen();
                p.id("accountId")?;
                p.balance("balanceAfterFen")?;
                p.currency("currency")?;
                Ok(Self::Refunded {
                    order_id: p.id("orderId")?,
                    user_id: p.id("userId")?,
                    delta_fen,
                })
            }
            ("AccountCredited", 1) => {
                p.id("accountId")?;
                p.id("userId")?;
                p.amount("deltaFen")?;
                p.balance("balanceAfterFen")?;
                p.currency("currency")?;
                p.string("reference", 255)?;
                Ok(Self::Credited)
            }
            (
                "AccountDebited" | "AccountDebitFailed" | "AccountRefunded" | "AccountCredited",
                v,
            ) => Err(Poison::new(
                PoisonClass::UnsupportedSchemaVersion,
                format!("{} schemaVersion {v} is not supported", raw.event_type),
            )),
            (other, _) => Err(Poison::new(
                PoisonClass::UnknownEventType,
                format!("unknown eventType {other:?} on the account topic"),
            )),
        }
    }

    pub fn order_id(&self) -> Option<i64> {
        match self {
            Self::Debited { order_id, .. }
            | Self::DebitFailed { order_id, .. }
            | Self::Refunded { order_id, .. } => Some(*order_id),
            Self::Credited => None,
        }
    }
}

/// Field access that turns every mismatch into a `SchemaViolation` (or `InvalidAmount`)
/// naming the field, mirroring what the JSON Schemas in `schemas/` require.
struct Payload<'a>(&'a Value);

impl Payload<'_> {
    fn field(&self, name: &str) -> Result<&Value, Poison> {
        self.0
            .get(name)
            .ok_or_else(|| Poison::new(PoisonClass::SchemaViolation, format!("missing {name}")))
    }

    fn violation(name: &str, expected: &str) -> Poison {
        Poison::new(
            PoisonClass::SchemaViolation,
            format!("{name} must be {expected}"),
        )
    }

    fn id(&self, name: &str) -> Result<i64, Poison> {
        self.field(name)?
            .as_i64()
            .filter(|id| *id > 0)
            .ok_or_else(|| Self::violation(name, "a positive integer"))
    }

    fn integer(&self, name: &str) -> Result<i64, Poison> {
        self.field(name)?
            .as_i64()
            .ok_or_else(|| Self::violation(name, "an integer"))
    }

    fn balance(&self, name: &str) -> Result<i64, Poison> {
        self.field(name)?
            .as_i64()
            .filter(|fen| *fen >= 0)
            .ok_or_else(|| Self::violation(name, "a non-negative integer"))
    }

    fn amount(&self, name: &str) -> Result<Amount, Poison> {
        Amount::from_json(self.field(name)?).ok_or_else(|| {
            Poison::new(
                PoisonClass::InvalidAmount,
                format!(
                    "{name} must be an integer number of minor units in 1..={}",
                    i64::MAX
                ),
            )
        })
    }

    fn currency(&self, name: &str) -> Result<Currency, Poison> {
        self.field(name)?
            .as_str()
            .and_then(Currency::parse)
            .ok_or_else(|| Self::violation(name, "an ISO 4217 code such as \"CNY\""))
    }

    fn string(&self, name: &str, max_len: usize) -> Result<String, Poison> {
        self.field(name)?
            .as_str()
            .filter(|s| !s.is_empty() && s.chars().count() <= max_len)
            .map(str::to_owned)
            .ok_or_else(|| Self::violation(name, &format!("a string of 1 to {max_len} characters")))
    }

    fn boolean(&self, name: &str) -> Result<bool, Poison> {
        self.field(name)?
            .as_bool()
            .ok_or_else(|| Self::violation(name, "a boolean"))
    }

    fn items(&self, name: &str) -> Result<Vec<OrderItem>, Poison> {
        let items = self
            .field(name)?
            .as_array()
            .filter(|items| !items.is_empty() && items.len() <= 1000)
            .ok_or_else(|| Self::violation(name, "an array of 1 to 1000 items"))?;
        items
            .iter()
            .map(|item| {
                if !item.is_object() {
                    return Err(Self::violation(name, "an array of objects"));
                }
                let item = Payload(item);
                Ok(OrderItem {
                    sku: item.string("sku", 64)?,
                    qty: item.id("qty")?,
                    price_fen: item.amount("priceFen")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(event_type: &str, version: u32, payload: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "eventId": Uuid::new_v4(), "eventType": event_type, "schemaVersion": version,
            "occurredAt": "2026-01-01T00:00:00Z", "payload": payload
        }))
        .unwrap_or_default()
    }

    fn created(amount: Value) -> Value {
        json!({"orderId": 7, "orderNo": "ORD-7", "userId": 42, "amountFen": amount,
               "currency": "CNY", "items": [{"sku": "A", "qty": 1, "priceFen": 100}],
               "idempotencyKey": "k"})
    }

    fn class_of(bytes: &[u8]) -> PoisonClass {
        let raw = match decode_envelope(Some(bytes), 1 << 20) {
            Ok(raw) => raw,
            Err(p) => return p.class,
        };
        match OrderEvent::decode(&raw) {
            Ok(event) => panic!("expected poison, decoded {event:?}"),
            Err(p) => p.class,
        }
    }

    #[test]
    fn a_valid_order_created_decodes() {
        let raw = decode_envelope(
            Some(&envelope("OrderCreated", 1, created(json!(100)))),
            1 << 20,
        )
        .expect("envelope");
        let OrderEvent::Created(c) = OrderEvent::decode(&raw).expect("decodes") else {
            panic!("wrong variant")
        };
        assert_eq!((c.order_id, c.user_id, c.amount_fen.fen()), (7, 42, 100));
    }

    #[test]
    fn each_kind_of_poison_is_named() {
        assert_eq!(class_of(b"not json"), PoisonClass::NotJson);
        assert_eq!(
            class_of(b"{\"eventId\": \"\xff\"}"),
            PoisonClass::InvalidUtf8
        );
        assert_eq!(class_of(b"{\"eventId\": 1}"), PoisonClass::SchemaViolation);
        assert_eq!(
            class_of(&envelope("Bogus", 1, json!({}))),
            PoisonClass::UnknownEventType
        );
        assert_eq!(
            class_of(&envelope("OrderCreated", 9, created(json!(1)))),
            PoisonClass::UnsupportedSchemaVersion
        );
        for amount in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!("1"),
            json!(9223372036854775808u64),
        ] {
            assert_eq!(
                class_of(&envelope("OrderCreated", 1, created(amount.clone()))),
                PoisonClass::InvalidAmount,
                "{amount}"
            );
        }
        let mut missing = created(json!(1));
        missing.as_object_mut().map(|m| m.remove("userId"));
        assert_eq!(
            class_of(&envelope("OrderCreated", 1, missing)),
            PoisonClass::SchemaViolation
        );
        assert_eq!(
            decode_envelope(Some(&[b' '; 100]), 10)
                .err()
                .map(|p| p.class),
            Some(PoisonClass::TooLarge)
        );
        assert_eq!(
            decode_envelope(None, 10).err().map(|p| p.class),
            Some(PoisonClass::Empty)
        );
    }

    #[test]
    fn account_events_decode_for_the_order_processor_and_bad_ones_are_named() {
        let decode = |event_type: &str, payload: Value| {
            let raw = decode_envelope(Some(&envelope(event_type, 1, payload)), 1 << 20)
                .expect("envelope");
            AccountEvent::decode(&raw)
        };
        let debited = json!({"accountId": 3, "userId": 42, "orderId": 7, "deltaFen": -100,
                             "balanceAfterFen": 900, "currency": "CNY"});
        assert_eq!(
            decode("AccountDebited", debited.clone()),
            Ok(AccountEvent::Debited {
                order_id: 7,
                user_id: 42,
                delta_fen: -100
            })
        );
        let mut positive = debited;
        positive["deltaFen"] = json!(100);
        assert_eq!(
            decode("AccountDebited", positive).map_err(|p| p.class),
            Err(PoisonClass::InvalidAmount)
        );
        assert_eq!(
            decode(
                "AccountDebitFailed",
                json!({"userId": 42, "orderId": 7, "reason": "INSUFFICIENT_BALANCE"})
            ),
            Ok(AccountEvent::DebitFailed {
                order_id: 7,
                user_id: 42,
                reason: DebitFailure::InsufficientBalance
            })
        );
        assert_eq!(
            decode(
                "AccountDebitFailed",
                json!({"userId": 42, "orderId": 7, "reason": "BORED"})
            )
            .map_err(|p| p.class),
            Err(PoisonClass::SchemaViolation)
        );
        assert_eq!(
            decode("OrderCreated", json!({})).map_err(|p| p.class),
            Err(PoisonClass::UnknownEventType)
        );
    }

    #[test]
    fn an_envelope_is_a_json_object_with_a_hyphenated_event_id() {
        let valid = json!({
            "eventId": "0b6e8f1e-5c1a-4e7b-9d3e-2f4a6b8c0d1e", "eventType": "OrderPaid",
            "schemaVersion": 1, "occurredAt": "2026-01-01T00:00:00Z", "payload": {}
        });
        let decode = |v: &Value| decode_envelope(Some(v.to_string().as_bytes()), 1 << 20);
        let raw = decode(&valid).expect("valid");
        assert_eq!(
            (
                raw.event_type.as_str(),
                raw.schema_version,
                raw.payload.clone()
            ),
            ("OrderPaid", 1, json!({}))
        );
        // An offset is kept as the instant it names; fields the envelope does not know are
        // ignored.
        let mut offset = valid.clone();
        offset["occurredAt"] = json!("2026-01-01T08:00:00+08:00");
        offset["traceId"] = json!("abc");
        assert_eq!(
            decode(&offset).map(|raw| raw.occurred_at),
            Ok(raw.occurred_at)
        );
        let as_array = json!([
            "0b6e8f1e-5c1a-4e7b-9d3e-2f4a6b8c0d1e",
            "OrderPaid",
            1,
            "2026-01-01T00:00:00Z",
            {}
        ]);
        let mut cases = vec![as_array];
        for id in [
            "0b6e8f1e5c1a4e7b9d3e2f4a6b8c0d1e",
            "{0b6e8f1e-5c1a-4e7b-9d3e-2f4a6b8c0d1e}",
            "urn:uuid:0b6e8f1e-5c1a-4e7b-9d3e-2f4a6b8c0d1e",
            "0b6e8f1e-5c1a-4e7b-9d3e-2f4a6b8c0d1g",
        ] {
            let mut v = valid.clone();
            v["eventId"] = json!(id);
            cases.push(v);
        }
        let mut numeric = valid.clone();
        numeric["eventId"] = json!(7);
        cases.push(numeric);
        // Each other envelope field missing or of the wrong type.
        for (field, bad) in [
            ("eventType", None),
            ("eventType", Some(json!(1))),
            ("schemaVersion", None),
            ("schemaVersion", Some(json!(-1))),
            ("schemaVersion", Some(json!(1.5))),
            ("schemaVersion", Some(json!("1"))),
            ("schemaVersion", Some(json!(4_294_967_296u64))),
            ("occurredAt", None),
            ("occurredAt", Some(json!("yesterday"))),
            ("occurredAt", Some(json!(1_767_225_600))),
            ("payload", None),
            ("payload", Some(json!(null))),
            ("payload", Some(json!([]))),
        ] {
            let mut v = valid.clone();
            match bad {
                Some(bad) => v[field] = bad,
                None => {
                    v.as_object_mut().map(|m| m.remove(field));
                }
            }
            cases.push(v);
        }
        for case in cases {
            let poison = decode(&case).expect_err("poison");
            assert_eq!(
                poison.class,
                PoisonClass::SchemaViolation,
                "{case}: {poison}"
            );
        }
    }
}
