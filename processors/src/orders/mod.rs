//! Orders and their saga: PENDING -> PAID | CANCELLED, PAID -> REFUNDED.
//!
//! Every state change writes the order row and the event announcing it (to the outbox) in
//! one transaction. The API creates and cancels orders (`store`), the order processor reacts to
//! what the account processor did (`processor`), and the timeout sweeper cancels orders
//! nobody paid for (`sweeper`).

pub mod processor;
pub mod saga;
pub mod store;
pub mod sweeper;

use serde::Serialize;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::Postgres;

/// Where an order is in the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Pending,
    Paid,
    Cancelled,
    Refunded,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 4] = [Self::Pending, Self::Paid, Self::Cancelled, Self::Refunded];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Paid => "PAID",
            Self::Cancelled => "CANCELLED",
            Self::Refunded => "REFUNDED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }
}

// Stored as the TEXT of `as_str` (the column's CHECK lists the same four); a row holding any
// other text fails to decode instead of becoming a status nobody handles.
impl sqlx::Type<Postgres> for OrderStatus {
    fn type_info() -> PgTypeInfo {
        <&str as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <&str as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl sqlx::Encode<'_, Postgres> for OrderStatus {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <&str as sqlx::Encode<Postgres>>::encode(self.as_str(), buf)
    }
}

impl sqlx::Decode<'_, Postgres> for OrderStatus {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        let text = <&str as sqlx::Decode<Postgres>>::decode(value)?;
        Self::parse(text).ok_or_else(|| format!("unknown order status {text:?}").into())
    }
}

/// Why an order was cancelled (`cancel_reason`, and `reason` of `OrderCancelled`). Debit
/// failures use the `AccountDebitFailed` reason as is.
pub mod reason {
    pub const USER_REQUESTED: &str = "USER_REQUESTED";
    pub const PAYMENT_TIMEOUT: &str = "PAYMENT_TIMEOUT";
}
