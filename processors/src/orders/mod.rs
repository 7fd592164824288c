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

// Stored as the TEXT of `as_str`; the column's CHECK lists the same four.
crate::db::text_column!(OrderStatus);

/// Why an order was cancelled (`cancel_reason`, and `reason` of `OrderCancelled`). Debit
/// failures use the `AccountDebitFailed` reason as is.
pub mod reason {
    pub const USER_REQUESTED: &str = "USER_REQUESTED";
    pub const PAYMENT_TIMEOUT: &str = "PAYMENT_TIMEOUT";
}
