//! The saga's transitions, in one pure function: what happens to an order in each status
//! when something happens to it. The order processor (account events), the API (a cancel
//! request) and the timeout sweeper all ask `next`; none of them restates the rules.
//!
//! PENDING -> PAID on a debit; PENDING -> CANCELLED on a debit failure, a cancel request or
//! the payment timeout; PAID -> REFUNDED when its refund lands. A debit that lands on a
//! CANCELLED order is compensated (a refund is requested and the order stays CANCELLED), and
//! the owner cancelling a PAID order requests its refund.

use super::{reason, OrderStatus};
use crate::events::DebitFailure;

/// What the saga knows of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    pub status: OrderStatus,
    /// A refund of this PAID order was requested already.
    pub refund_requested: bool,
    /// The refund of this order has landed already.
    pub refunded: bool,
}

impl Order {
    /// An order in `status` with no refund requested or landed.
    pub fn new(status: OrderStatus) -> Self {
        Self {
            status,
            refund_requested: false,
            refunded: false,
        }
    }
}

/// What can happen to an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The account processor took the money (`AccountDebited`).
    Debited,
    /// The account processor could not (`AccountDebitFailed`).
    DebitFailed(DebitFailure),
    /// The money went back (`AccountRefunded`).
    Refunded,
    /// The owner asked to cancel (`POST /v1/orders/{id}/cancel`).
    CancelRequested,
    /// Nobody paid within `orders.payment_timeout_s`.
    PaymentTimeout,
}

/// What the saga does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// PENDING -> PAID, announced by `OrderPaid`.
    Pay,
    /// PENDING -> CANCELLED, announced by `OrderCancelled`. `refund_required` is set whenever
    /// a debit may be on its way (the account processor refunds only a debit that exists).
    Cancel {
        reason: &'static str,
        refund_required: bool,
    },
    /// A debit landed on a CANCELLED order: it stays CANCELLED and asks for the money back
    /// (`OrderCancelled` with a refund, under its cancel reason).
    Compensate,
    /// The owner cancels a PAID order: it stays PAID until the refund lands, and asks for it.
    RequestRefund { reason: &'static str },
    /// PAID -> REFUNDED.
    CompleteRefund,
    /// A CANCELLED order's compensating refund landed: recorded, the order stays CANCELLED.
    RecordRefund,
    /// The saga already moved past what this reports (a redelivery with a new id, a debit
    /// failure after a timeout cancel, ...): nothing to do.
    Stale,
    /// A refund reported for an order that was never paid: ignored, and said so.
    Unexpected,
    /// A cancel request the order can no longer take.
    Refuse(Refusal),
}

/// Why a cancel request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Already CANCELLED or REFUNDED.
    AlreadyFinal(OrderStatus),
    /// A PAID order whose refund is already on its way.
    RefundAlreadyRequested,
}

/// The saga: what `trigger` does to `order`.
pub fn next(order: Order, trigger: Trigger) -> Transition {
    use OrderStatus::{Cancelled, Paid, Pending, Refunded};
    use Transition::*;
    match (order.status, trigger) {
        (Pending, Trigger::Debited) => Pay,
        // An `OrderCreated` that matched no order (forged, or garbled upstream) failed; the
        // order's own event may still come.
        (Pending, Trigger::DebitFailed(failure)) if failure.refutes_event() => Stale,
        (Pending, Trigger::DebitFailed(failure)) => Cancel {
            reason: failure.as_str(),
            refund_required: false,
        },
        (_, Trigger::CancelRequested) => match cancel_requested(order) {
            Ok(CancelRequest::Cancel { reason }) => Cancel {
                reason,
                refund_required: true,
            },
            Ok(CancelRequest::RequestRefund { reason }) => RequestRefund { reason },
            Err(refusal) => Refuse(refusal),
        },
        (Pending, Trigger::PaymentTimeout) => Cancel {
            reason: reason::PAYMENT_TIMEOUT,
            refund_required: true,
        },
        (Pending, Trigger::Refunded) => Unexpected,
        (Paid, Trigger::Refunded) => CompleteRefund,
        (Cancelled, Trigger::Debited) => Compensate,
        (Cancelled, Trigger::Refunded) if !order.refunded => RecordRefund,
        (Paid | Cancelled | Refunded, _) => Stale,
    }
}

/// What the owner's cancel request does, when the order can take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRequest {
    /// PENDING -> CANCELLED, asking for a refund of a debit that may be on its way.
    Cancel { reason: &'static str },
    /// A PAID order stays PAID until its refund lands, and asks for it.
    RequestRefund { reason: &'static str },
}

/// The owner's cancel request, the part of `next` the API carries out: a typed answer with
/// no transition a cancel request cannot have.
pub fn cancel_requested(order: Order) -> Result<CancelRequest, Refusal> {
    let reason = reason::USER_REQUESTED;
    match order.status {
        OrderStatus::Pending => Ok(CancelRequest::Cancel { reason }),
        OrderStatus::Paid if order.refund_requested => Err(Refusal::RefundAlreadyRequested),
        OrderStatus::Paid => Ok(CancelRequest::RequestRefund { reason }),
        status @ (OrderStatus::Cancelled | OrderStatus::Refunded) => {
            Err(Refusal::AlreadyFinal(status))
        }
    }
}

/// The statuses from which the payment timeout cancels an order (the sweeper selects these).
pub fn timeout_applies_to() -> impl Iterator<Item = OrderStatus> {
    OrderStatus::ALL.into_iter().filter(|&s| {
        matches!(
            next(Order::new(s), Trigger::PaymentTimeout),
            Transition::Cancel { .. }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus::*;
    use Transition::*;

    const FAILED: Trigger = Trigger::DebitFailed(DebitFailure::InsufficientBalance);

    #[test]
    fn every_status_and_trigger_has_its_transition() {
        let cancel = |reason, refund_required| Cancel {
            reason,
            refund_required,
        };
        // (status, trigger, transition), for an order with no refund requested or landed.
        let table = [
            (Pending, Trigger::Debited, Pay),
            (Pending, FAILED, cancel("INSUFFICIENT_BALANCE", false)),
            (Pending, Trigger::Refunded, Unexpected),
            (
                Pending,
                Trigger::CancelRequested,
                cancel(reason::USER_REQUESTED, true),
            ),
            (
                Pending,
                Trigger::PaymentTimeout,
                cancel(reason::PAYMENT_TIMEOUT, true),
            ),
            (Paid, Trigger::Debited, Stale),
            (Paid, FAILED, Stale),
            (Paid, Trigger::Refunded, CompleteRefund),
            (
                Paid,
                Trigger::CancelRequested,
                RequestRefund {
                    reason: reason::USER_REQUESTED,
                },
            ),
            (Paid, Trigger::PaymentTimeout, Stale),
            (Cancelled, Trigger::Debited, Compensate),
            (Cancelled, FAILED, Stale),
            (Cancelled, Trigger::Refunded, RecordRefund),
            (
                Cancelled,
                Trigger::CancelRequested,
                Refuse(Refusal::AlreadyFinal(Cancelled)),
            ),
            (Cancelled, Trigger::PaymentTimeout, Stale),
            (Refunded, Trigger::Debited, Stale),
            (Refunded, FAILED, Stale),
            (Refunded, Trigger::Refunded, Stale),
            (
                Refunded,
                Trigger::CancelRequested,
                Refuse(Refusal::AlreadyFinal(Refunded)),
            ),
            (Refunded, Trigger::PaymentTimeout, Stale),
        ];
        assert_eq!(
            table.len(),
            OrderStatus::ALL.len() * 5,
            "every pair is listed"
        );
        for (status, trigger, expected) in table {
            assert_eq!(
                next(Order::new(status), trigger),
                expected,
                "{status:?} {trigger:?}"
            );
        }
    }

    #[test]
    fn a_debit_refused_for_not_matching_any_order_leaves_the_order_alone() {
        for failure in [DebitFailure::OrderNotFound, DebitFailure::OrderMismatch] {
            for status in OrderStatus::ALL {
                assert_eq!(
                    next(Order::new(status), Trigger::DebitFailed(failure)),
                    Stale,
                    "{status:?} {failure:?}"
                );
            }
        }
    }

    #[test]
    fn a_refund_already_requested_or_landed_is_not_asked_for_or_recorded_twice() {
        let requested = Order {
            status: Paid,
            refund_requested: true,
            refunded: false,
        };
        assert_eq!(
            next(requested, Trigger::CancelRequested),
            Refuse(Refusal::RefundAlreadyRequested)
        );
        assert_eq!(next(requested, Trigger::Refunded), CompleteRefund);
        let landed = Order {
            status: Cancelled,
            refund_requested: false,
            refunded: true,
        };
        assert_eq!(next(landed, Trigger::Refunded), Stale);
        assert_eq!(next(landed, Trigger::Debited), Compensate);
    }

    #[test]
    fn every_debit_failure_cancels_a_pending_order_under_its_own_reason() {
        for failure in [
            DebitFailure::InsufficientBalance,
            DebitFailure::AccountNotFound,
            DebitFailure::CurrencyMismatch,
            DebitFailure::AccountFrozen,
        ] {
            assert_eq!(
                next(Order::new(Pending), Trigger::DebitFailed(failure)),
                Cancel {
                    reason: failure.as_str(),
                    refund_required: false
                }
            );
        }
    }

    #[test]
    fn only_pending_orders_time_out() {
        assert_eq!(timeout_applies_to().collect::<Vec<_>>(), [Pending]);
    }
}
