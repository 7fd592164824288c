//! The order saga end to end: real HTTP, the real PostgreSQL, the real broker.

mod common;

use common::http::{Parts, System};
use common::*;
use serde_json::json;
use uuid::Uuid;

const USER: i64 = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_paid_within_seconds_and_the_ledger_agrees_with_the_balance() {
    let env = TestEnv::new(2).await;
    let order_events = env.collect(&env.settings.topics.order_events);
    let system = System::start(&env, &env.settings, Parts::ALL).await;
    let api = &system.api;
    let account = api.funded_account(USER, 10_000).await;

    let placed = api.place_order(USER, "order-1", 2_500).await.expect(201);
    assert_eq!(placed.body["status"], "PENDING");
    let paid = api.wait_order(USER, placed.id(), "PAID").await;
    assert!(paid["paidAt"].is_string(), "{paid}");
    assert_eq!(api.balance(USER, account).await, 7_500);

    let entries = api
        .get(&format!("/v1/accounts/{account}/entries"), &api.token(USER))
        .await
        .expect(200)
        .body;
    let kinds: Vec<&str> = entries["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["DEBIT", "DEPOSIT"], "{entries}");
    assert_eq!(entries["items"][0]["balanceAfterFen"], 7_500);
    assert_eq!(entries["items"][0]["deltaFen"], -2_500);
    assert_eq!(entries["items"][0]["orderId"], placed.id());

    // OrderCreated, then OrderPaid, both keyed by the user.
    let events = wait_until("OrderPaid on order.events", || async {
        let all = order_events.snapshot();
        all.iter()
            .any(|m| m.json()["eventType"] == "OrderPaid")
            .then_some(all)
    })
    .await;
    let types: Vec<String> = events
        .iter()
        .map(|m| m.json()["eventType"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(types, ["OrderCreated", "OrderPaid"]);
    assert!(events
        .iter()
        .all(|m| m.key.as_deref() == Some(USER.to_string().as_bytes())));
    system.stop().await;
    env.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_balance_cancels_the_order_with_the_reason_and_leaves_the_balance_unchanged() {
    let env = TestEnv::new(2).await;
    let system = System::start(&env, &env.settings, Parts::ALL).await;
    let api = &system.api;
    let account = api.funded_account(USER, 1_000).await;

    let placed = api.place_order(USER, "too-much", 5_000).await.expect(201);
    let cancelled = api.wait_order(USER, placed.id(), "CANCELLED").await;
    assert_eq!(cancelled["cancelReason"], "INSUFFICIENT_BALANCE");
    assert_eq!(api.balance(USER, account).await, 1_000);
    assert_eq!(
        env.scalar("SELECT count(*) FROM transfers WHERE kind <> 'DEPOSIT'")
            .await,
        0
    );
    system.stop().await;
    env.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_paid_order_refunds_it_exactly_once() {
    let env = TestEnv::new(2).await;
    let system = System::start(&env, &env.settings, Parts::ALL).await;
    let api = &system.api;
    let account = api.funded_account(USER, 10_000).await;
    let id = api.place_order(USER, "order", 4_000).await.expect(201).id();
    api.wait_order(USER, id, "PAID").await;

    let path = format!("/v1/orders/{id}/cancel");
    let accepted = api
        .post(&path, &api.token(USER), "cancel", &json!({}))
        .await
        .expect(202);
    assert_eq!(accepted.body["status"], "PAID");
    assert!(accepted.body["refundRequestedAt"].is_string());
    // The same request again is a replay; a new cancel request is refused.
    assert!(
        api.post(&path, &api.token(USER), "cancel", &json!({}))
            .await
            .expect(202)
            .replayed
    );
    let again = api
        .post(&path, &api.token(USER), "cancel-again", &json!({}))
        .await
        .expect(409);
    assert_eq!(again.code(), "REFUND_ALREADY_REQUESTED");

    let refunded = api.wait_order(USER, id, "REFUNDED").await;
    assert!(refunded["refundedAt"].is_string());
    assert_eq!(api.balance(USER, account).await, 10_000);
    let final_cancel = api
        .post(&path, &api.token(USER), "cancel-3", &json!({}))
        .await
        .expect(409);
    assert_eq!(final_cancel.code(), "ORDER_NOT_CANCELLABLE");
    system.stop().await;
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM transfers WHERE order_id = {id} AND kind = 'REFUND'"
        ))
        .await,
        1
    );
    env.assert_invariants().await;
}

/// The account processor is down while the order times out; when it comes back it debits
/// (late) and then reads the timeout's cancel and refunds. The order never becomes PAID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_past_its_payment_timeout_is_cancelled_and_a_late_debit_is_refunded() {
    let env = TestEnv::new(2).await;
    let mut settings = env.settings.clone();
    settings.orders.payment_timeout_s = 1;
    settings.orders.sweep_interval_ms = 100;
    let parts = Parts {
        account_processor: false,
        ..Parts::ALL
    };
    let system = System::start(&env, &settings, parts).await;
    let api = &system.api;
    let account = api.funded_account(USER, 10_000).await;
    let id = api.place_order(USER, "slow", 3_000).await.expect(201).id();

    let cancelled = api.wait_order(USER, id, "CANCELLED").await;
    assert_eq!(cancelled["cancelReason"], "PAYMENT_TIMEOUT");

    let late = common::spawn_worker(&settings, paystream_processors::accounts::processor::run);
    let settled = wait_until("the late debit to be refunded", || async {
        let order = api.order(USER, id).await;
        order["refundedAt"].is_string().then_some(order)
    })
    .await;
    assert_eq!(settled["status"], "CANCELLED");
    assert!(
        settled["paidAt"].is_null(),
        "a cancelled order must never be PAID: {settled}"
    );
    assert_eq!(api.balance(USER, account).await, 10_000);
    late.stop().await;
    system.stop().await;
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM transfers WHERE order_id = {id}"
        ))
        .await,
        2
    );
    env.assert_invariants().await;
}

/// A debit that reaches the order processor after the cancel was settled (here: the order's
/// `OrderCreated` sent again, as a re-publish or a dead-letter replay would) is compensated:
/// the order processor asks for a refund and the order stays CANCELLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_that_lands_after_the_cancel_was_settled_is_refunded_by_compensation() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, Parts::ALL).await;
    let api = &system.api;
    let account = api.funded_account(USER, 1_000).await;
    // Not enough money: the debit fails and the order is cancelled.
    let id = api.place_order(USER, "order", 2_000).await.expect(201).id();
    api.wait_order(USER, id, "CANCELLED").await;
    // Money arrives, and the old OrderCreated is delivered again under a new event id.
    api.post(
        &format!("/v1/accounts/{account}/deposits"),
        &api.admin_token(),
        "top-up",
        &json!({"amountFen": 5_000}),
    )
    .await
    .expect(201);
    let producer = env.producer();
    env.produce(
        &producer,
        &USER.to_string(),
        &common::order_created(Uuid::new_v4(), id, USER, 2_000),
    )
    .await;

    let settled = wait_until("the compensating refund", || async {
        let order = api.order(USER, id).await;
        order["refundedAt"].is_string().then_some(order)
    })
    .await;
    assert_eq!(settled["status"], "CANCELLED");
    assert_eq!(settled["cancelReason"], "INSUFFICIENT_BALANCE");
    assert_eq!(api.balance(USER, account).await, 6_000);
    system.stop().await;
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM transfers WHERE order_id = {id} AND kind = 'DEBIT'"
        ))
        .await,
        1
    );
    assert_eq!(
        env.scalar(&format!(
            "SELECT count(*) FROM transfers WHERE order_id = {id} AND kind = 'REFUND'"
        ))
        .await,
        1
    );
    env.assert_invariants().await;
}

/// Orders are cancelled right after they are placed, while the processors race to pay them.
/// Each ends in one consistent outcome: CANCELLED with no money moved or with the debit given
/// back, or REFUNDED — and all the money is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_racing_with_payment_ends_in_exactly_one_consistent_outcome() {
    let env = TestEnv::new(2).await;
    let system = System::start(&env, &env.settings, Parts::ALL).await;
    let api = &system.api;
    let account = api.funded_account(USER, 1_000_000).await;
    let token = api.token(USER);

    let mut ids = Vec::new();
    for i in 0..40 {
        let id = api
            .place_order(USER, &format!("race-{i}"), 1_000 + i)
            .await
            .expect(201)
            .id();
        // Spread the cancels over the payment's progress.
        if i % 4 == 1 {
            api.wait_order(USER, id, "PAID").await;
        }
        let cancel = api
            .post(
                &format!("/v1/orders/{id}/cancel"),
                &token,
                &format!("cancel-{i}"),
                &json!({}),
            )
            .await;
        assert!(matches!(cancel.status.as_u16(), 200 | 202), "{cancel:?}");
        ids.push((id, cancel.status.as_u16()));
    }
    for &(id, status) in &ids {
        let expected = if status == 200 {
            "CANCELLED"
        } else {
            "REFUNDED"
        };
        let order = api.wait_order(USER, id, expected).await;
        assert!(
            order["paidAt"].is_null() || expected == "REFUNDED",
            "{order}"
        );
    }
    // Every debit that slipped in before a cancel has been given back.
    wait_until("every debit refunded", || async {
        let open = env.scalar(
            "SELECT count(*) FROM transfers d WHERE d.kind = 'DEBIT' AND NOT EXISTS \
             (SELECT 1 FROM transfers r WHERE r.kind = 'REFUND' AND r.order_id = d.order_id)",
        )
        .await;
        let unrecorded = env.scalar(
            "SELECT count(*) FROM orders o WHERE EXISTS (SELECT 1 FROM transfers r WHERE r.kind = 'REFUND' AND r.order_id = o.id) \
             AND o.refunded_at IS NULL",
        )
        .await;
        (open == 0 && unrecorded == 0).then_some(())
    })
    .await;
    assert_eq!(api.balance(USER, account).await, 1_000_000);
    system.stop().await;
    env.assert_invariants().await;
}
