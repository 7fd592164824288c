//! The event contract of SPEC §2: the JSON envelope, one payload type per event type and
//! version, and decoding that says *why* bytes are not an event (the poison classes of §3).
//!
//! Every payload here has a JSON Schema under `schemas/<EventType>.v<version>.json`; the test
//! suite validates what the code emits against those files.//!
//! Decoding (`decode`) reads the envelope and types each payload, naming the poison class of
//! whatever is not an event.

#[cfg(test)]
mod conformance;
mod decode;

pub use decode::{decode_envelope, AccountEvent, OrderEvent, Poison, PoisonClass, RawEvent};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{Amount, Currency};

/// What a payload type declares about itself, so the envelope cannot disagree with it.
pub trait EventPayload: Serialize {
    const TYPE: &'static str;
    const VERSION: u32;
}

/// An event as it travels: `{eventId, eventType, schemaVersion, occurredAt, payload}`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<P> {
    pub event_id: Uuid,
    pub event_type: &'static str,
    pub schema_version: u32,
    #[serde(serialize_with = "rfc3339")]
    pub occurred_at: DateTime<Utc>,
    pub payload: P,
}

fn rfc3339<S: serde::Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Millis, true))
}

impl<P: EventPayload> Envelope<P> {
    pub fn new(event_id: Uuid, occurred_at: DateTime<Utc>, payload: P) -> Self {
        Self {
            event_id,
            event_type: P::TYPE,
            schema_version: P::VERSION,
            occurred_at,
            payload,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain structs of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Derives the id of an event emitted because of `cause`, so that re-emitting for the same
/// cause (which dedupe should already prevent) still carries the same id downstream.
pub fn derived_event_id(cause: Uuid, event_type: &str) -> Uuid {
    Uuid::new_v5(&cause, event_type.as_bytes())
}

// ---------------------------------------------------------------------------------------
// Payloads

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCreated {
    pub order_id: i64,
    pub order_no: String,
    pub user_id: i64,
    pub amount_fen: Amount,
    pub currency: Currency,
    pub items: Vec<OrderItem>,
    pub idempotency_key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderItem {
    pub sku: String,
    pub qty: i64,
    pub price_fen: Amount,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPaid {
    pub order_id: i64,
    pub user_id: i64,
    pub amount_fen: Amount,
    pub currency: Currency,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCancelled {
    pub order_id: i64,
    pub user_id: i64,
    pub reason: String,
    pub refund_required: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountDebited {
    pub account_id: i64,
    pub user_id: i64,
    pub order_id: i64,
    /// Always negative: money leaves the user's account.
    pub delta_fen: i64,
    pub balance_after_fen: i64,
    pub currency: Currency,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DebitFailure {
    InsufficientBalance,
    AccountNotFound,
    CurrencyMismatch,
    AccountFrozen,
    /// No order has the event's `orderId`: nothing is owed, so nothing moves.
    OrderNotFound,
    /// The order exists, but its user, amount or currency is not the event's.
    OrderMismatch,
}

impl DebitFailure {
    pub fn parse(reason: &str) -> Option<Self> {
        [
            Self::InsufficientBalance,
            Self::AccountNotFound,
            Self::CurrencyMismatch,
            Self::AccountFrozen,
            Self::OrderNotFound,
            Self::OrderMismatch,
        ]
        .into_iter()
        .find(|r| r.as_str() == reason)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InsufficientBalance => "INSUFFICIENT_BALANCE",
            Self::AccountNotFound => "ACCOUNT_NOT_FOUND",
            Self::CurrencyMismatch => "CURRENCY_MISMATCH",
            Self::AccountFrozen => "ACCOUNT_FROZEN",
            Self::OrderNotFound => "ORDER_NOT_FOUND",
            Self::OrderMismatch => "ORDER_MISMATCH",
        }
    }

    /// Whether the failure is about the event rather than the order it names: an
    /// `OrderCreated` that does not match any order says nothing about the real order with
    /// that id (whose own event may still come), so the saga must not cancel it.
    pub fn refutes_event(self) -> bool {
        matches!(self, Self::OrderNotFound | Self::OrderMismatch)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountDebitFailed {
    pub user_id: i64,
    pub order_id: i64,
    pub reason: DebitFailure,
    pub amount_fen: Amount,
    pub currency: Currency,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountRefunded {
    pub account_id: i64,
    pub user_id: i64,
    pub order_id: i64,
    /// Always positive: money returns to the user's account.
    pub delta_fen: i64,
    pub balance_after_fen: i64,
    pub currency: Currency,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountCredited {
    pub account_id: i64,
    pub user_id: i64,
    pub delta_fen: i64,
    pub balance_after_fen: i64,
    pub currency: Currency,
    pub reference: String,
}

macro_rules! event_payload {
    ($($ty:ident),*) => {$(
        impl EventPayload for $ty {
            const TYPE: &'static str = stringify!($ty);
            const VERSION: u32 = 1;
        }
    )*};
}
event_payload!(
    OrderCreated,
    OrderPaid,
    OrderCancelled,
    AccountDebited,
    AccountDebitFailed,
    AccountRefunded,
    AccountCredited
);

// ---------------------------------------------------------------------------------------
// Decoding
