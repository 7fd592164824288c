//! Many concurrent clients, random cancels: afterwards every order is terminal, the money
//! adds up, the invariants of SPEC §6 hold and every emitted event matches its schema.

mod common;

use std::collections::HashMap;

use common::http::{Parts, System};
use common::*;
use serde_json::{json, Value};

const ORDERS: usize = 2_000;
const CLIENTS: usize = 16;
const USERS: i64 = 40;

async fn cancel(api: &common::http::Client, user: i64, id: i64) {
    let reply = api
        .post(
            &format!("/v1/orders/{id}/cancel"),
            &api.token(user),
            &format!("cancel-{id}"),
            &json!({}),
        )
        .await;
    assert!(
        matches!(
            (reply.status.as_u16(), reply.code()),
            (200 | 202, _) | (409, "ORDER_NOT_CANCELLABLE")
        ),
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_orders_from_concurrent_clients_with_random_cancels_all_settle_consistently() {
    let env = TestEnv::new(3).await;
    // What the code emits: what the relay published, and whatever it had not yet when the
    // system stopped.
    let topics = [
        env.settings.topics.order_events.clone(),
        env.settings.topics.account_events.clone(),
    ];
    let wires: Vec<_> = topics.iter().map(|topic| env.collect(topic)).collect();
    let system = System::start(&env, &env.settings, Parts::ALL).await;
    let api = system.api.clone();

    // Most users can afford everything; a few run dry, so some debits fail.
    let mut deposited = 0;
    for user in 1..=USERS {
        let balance = if user % 8 == 0 { 20_000 } else { 10_000_000 };
        api.funded_account(user, balance).await;
        deposited += balance;
    }

    let per_client = ORDERS / CLIENTS;
    let clients = (0..CLIENTS).map(|c| {
        let api = api.clone();
        tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (c as u64 + 1));
            let mut placed = Vec::with_capacity(per_client);
            let mut later = Vec::new();
            for i in 0..per_client {
                let user = 1 + rng.below(USERS as u64) as i64;
                let amount = 100 + rng.below(5_000) as i64;
                let key = format!("soak-{c}-{i}");
                let id = api.place_order(user, &key, amount).await.expect(201).id();
                match rng.below(10) {
                    // Cancel at once: usually while the payment is in flight.
                    0 | 1 => cancel(&api, user, id).await,
                    // Cancel after the other clients' orders: usually once PAID.
                    2 | 3 => later.push((user, id)),
                    _ => {}
                }
                placed.push(id);
            }
            (placed, later)
        })
    });
    let mut ids = Vec::new();
    let mut later = Vec::new();
    for client in clients {
        let (placed, deferred) = client.await.expect("client task");
        ids.extend(placed);
        later.push(deferred);
    }
    assert_eq!(ids.len(), ORDERS);
    let cancellers = later.into_iter().map(|deferred| {
        let api = api.clone();
        tokio::spawn(async move {
            for (user, id) in deferred {
                cancel(&api, user, id).await;
            }
        })
    });
    for canceller in cancellers {
        canceller.await.expect("canceller task");
    }

    wait_until("every order settled", || async {
        let unsettled = env
            .scalar(
                r#"
                SELECT count(*) FROM orders o
                WHERE o.status = 'PENDING'
                   OR (o.status = 'PAID' AND o.refund_requested_at IS NOT NULL)
                   OR (o.status = 'CANCELLED' AND EXISTS
                        (SELECT 1 FROM transfers t WHERE t.order_id = o.id AND t.kind = 'DEBIT')
                       AND o.refunded_at IS NULL)
                "#,
            )
            .await;
        (unsettled == 0).then_some(())
    })
    .await;
    system.stop().await;

    let statuses: HashMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT status, count(*) FROM orders GROUP BY status")
            .fetch_all(&env.pool)
            .await
            .expect("statuses")
            .into_iter()
            .collect();
    assert_eq!(
        statuses.values().sum::<i64>(),
        ORDERS as i64,
        "{statuses:?}"
    );
    for status in ["PAID", "CANCELLED", "REFUNDED"] {
        assert!(
            statuses.get(status).copied().unwrap_or(0) > 0,
            "no {status} order: {statuses:?}"
        );
    }
    let paid = env
        .scalar("SELECT sum(amount_fen)::bigint FROM orders WHERE status = 'PAID'")
        .await;
    let held = env
        .scalar("SELECT sum(balance_fen)::bigint FROM accounts WHERE kind = 'USER'")
        .await;
    assert_eq!(
        held,
        deposited - paid,
        "users hold what they deposited minus what they paid"
    );
    env.assert_invariants().await;

    // Everything the code emitted during the soak matches its schema.
    let mut payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT payload FROM outbox")
        .fetch_all(&env.pool)
        .await
        .expect("outbox");
    for (topic, wire) in topics.iter().zip(&wires) {
        let published: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox_published WHERE topic = $1")
                .bind(topic)
                .fetch_one(&env.pool)
                .await
                .expect("published");
        let received = wire.wait_for(published as usize).await;
        payloads.extend(received.into_iter().map(|r| r.value));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for payload in payloads {
        let event: Value = serde_json::from_slice(&payload).expect("JSON");
        let event_type = event["eventType"].as_str().expect("eventType").to_owned();
        assert_valid(&schemas_dir(), &event_type, &event);
        *seen.entry(event_type).or_default() += 1;
    }
    for expected in [
        "OrderCreated",
        "OrderPaid",
        "OrderCancelled",
        "AccountCredited",
        "AccountDebited",
        "AccountDebitFailed",
        "AccountRefunded",
    ] {
        assert!(
            seen.contains_key(expected),
            "no {expected} emitted: {seen:?}"
        );
    }
}
