//! The HTTP API's contract: idempotency keys, ownership, and bad input — over real HTTP
//! against the real PostgreSQL (and the real broker where money moves).

mod common;

use std::collections::HashSet;

use common::http::{order_body, Parts, System};
use common::*;
use serde_json::json;

const NO_WORKERS: Parts = Parts {
    account_processor: false,
    order_processor: false,
    relay: false,
    sweeper: false,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_with_the_same_body_replays_the_first_response() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, NO_WORKERS).await;
    let api = &system.api;
    let first = api.place_order(1, "k-1", 500).await.expect(201);
    assert!(!first.replayed);
    // Same body with its fields in another order and other whitespace: the same request.
    let body = r#"{ "items": [{"priceFen": 500, "qty": 1, "sku": "SKU-1"}], "currency": "CNY", "amountFen": 500 }"#;
    let second = api
        .send(
            "POST",
            "/v1/orders",
            Some(&api.token(1)),
            Some("k-1"),
            Some(body.to_owned()),
        )
        .await
        .expect(201);
    assert!(second.replayed);
    assert_eq!(second.body, first.body);
    assert_eq!(env.scalar("SELECT count(*) FROM orders").await, 1);
    assert_eq!(env.scalar("SELECT count(*) FROM outbox").await, 1);

    let other = api.place_order(1, "k-1", 600).await.expect(422);
    assert_eq!(other.code(), "IDEMPOTENCY_KEY_REUSED");
    let missing = api
        .send(
            "POST",
            "/v1/orders",
            Some(&api.token(1)),
            None,
            Some(order_body(1).to_string()),
        )
        .await
        .expect(400);
    assert_eq!(missing.code(), "IDEMPOTENCY_KEY_REQUIRED");
    assert_eq!(env.scalar("SELECT count(*) FROM orders").await, 1);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_with_one_key_create_exactly_one_order() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, NO_WORKERS).await;
    let replies = futures::future::join_all((0..50).map(|_| {
        let api = system.api.clone();
        async move { api.place_order(3, "one-key", 700).await }
    }))
    .await;
    let mut ids = HashSet::new();
    for reply in &replies {
        match reply.status.as_u16() {
            201 => {
                ids.insert(reply.id());
            }
            409 => assert_eq!(reply.code(), "IDEMPOTENCY_KEY_IN_USE", "{reply:?}"),
            _ => panic!("unexpected reply {reply:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "every success names the same order: {ids:?}");
    assert_eq!(env.scalar("SELECT count(*) FROM orders").await, 1);
    assert_eq!(env.scalar("SELECT count(*) FROM outbox").await, 1);
    // Once the first finished, the key replays.
    assert!(
        system
            .api
            .place_order(3, "one-key", 700)
            .await
            .expect(201)
            .replayed
    );
    system.stop().await;
}

/// A client that retries at once, with the same key, after any answer — a replay or a refusal
/// made after the key was claimed — is answered again, never told the key is still in use: the
/// transaction that held the key is over before the answer leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_right_after_an_answer_is_never_told_the_key_is_in_use() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, NO_WORKERS).await;
    let api = &system.api;
    let token = api.token(4);
    // Eight clients at once, each with its own keys, keep the server busy, which is when a
    // rollback left for later shows. No key is ever used by two requests at the same time.
    futures::future::join_all((0..8).map(|client| {
        let token = &token;
        async move {
            let key = format!("retry-{client}");
            let order = api.place_order(4, &key, 400).await.expect(201).id();
            let cancel = format!("/v1/orders/{order}/cancel");
            api.post(&cancel, token, &format!("cancel-{client}"), &json!({}))
                .await
                .expect(200);
            for _ in 0..25 {
                assert!(api.place_order(4, &key, 400).await.expect(201).replayed);
                // Refused after the claim: the order is already final, so nothing is stored
                // and the retry runs again.
                let refused = api
                    .post(
                        &cancel,
                        token,
                        &format!("cancel-again-{client}"),
                        &json!({}),
                    )
                    .await
                    .expect(409);
                assert_eq!(refused.code(), "ORDER_NOT_CANCELLABLE");
            }
        }
    }))
    .await;
    assert_eq!(env.scalar("SELECT count(*) FROM orders").await, 8);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_used_by_another_user_never_returns_the_first_users_response() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, NO_WORKERS).await;
    let api = &system.api;
    let a = api.place_order(10, "shared-key", 800).await.expect(201);
    let b = api.place_order(11, "shared-key", 800).await.expect(201);
    assert!(!b.replayed);
    assert_ne!(a.id(), b.id());
    assert_eq!(b.body["userId"], 11);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_idempotency_key_is_a_new_request() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, NO_WORKERS).await;
    let api = &system.api;
    let first = api.place_order(12, "old-key", 900).await.expect(201);
    sqlx::query("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
        .execute(&env.pool)
        .await
        .expect("expire");
    let second = api.place_order(12, "old-key", 900).await.expect(201);
    assert!(!second.replayed);
    assert_ne!(first.id(), second.id());
    system.stop().await;
}

/// Expired keys are deleted however many there are: the order worker's first pass clears
/// 25,000 of them (the sweeper used to delete 1,000 per round, fewer than a busy API stores,
/// and only after its first interval), while a key that has not expired stays and replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_idempotency_keys_are_deleted_however_many_and_a_live_key_still_replays() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, NO_WORKERS).await;
    let api = &system.api;
    let live = api.place_order(13, "live-key", 700).await.expect(201);
    sqlx::query(
        "INSERT INTO idempotency_keys (user_id, key, request_hash, response_status, response_body, expires_at) \
         SELECT 99, 'old-' || g, '\\x00', 201, '{}', now() - interval '1 minute' \
         FROM generate_series(1, 25000) AS g",
    )
    .execute(&env.pool)
    .await
    .expect("expired keys");

    let mut settings = env.settings.clone();
    // No sweeper round during the test: the expiry must not depend on it.
    settings.orders.sweep_interval_ms = 3_600_000;
    let sweeper = spawn_worker(
        &settings,
        paystream_processors::api::idempotency::run_expiry,
    );
    wait_until("the expired keys to be deleted", || async {
        (env.scalar("SELECT count(*) FROM idempotency_keys WHERE user_id = 99")
            .await
            == 0)
            .then_some(())
    })
    .await;
    sweeper.stop().await;
    assert_eq!(
        paystream_processors::telemetry::METRICS
            .idempotency_keys_expired
            .get(),
        25_000,
        "paystream_idempotency_keys_expired_total counts what was deleted"
    );
    let again = api.place_order(13, "live-key", 700).await.expect(201);
    assert!(again.replayed, "the live key was deleted: {again:?}");
    assert_eq!(again.id(), live.id());
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_see_and_touch_only_their_own_orders_and_accounts() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, NO_WORKERS).await;
    let api = &system.api;
    let (alice, bob) = (api.token(20), api.token(21));
    let account = api
        .post("/v1/accounts", &alice, "open", &json!({"currency": "CNY"}))
        .await
        .expect(201)
        .id();
    let order = api.place_order(20, "o", 100).await.expect(201).id();

    for path in [
        format!("/v1/orders/{order}"),
        format!("/v1/accounts/{account}"),
        format!("/v1/accounts/{account}/entries"),
    ] {
        let reply = api.get(&path, &bob).await.expect(404);
        assert!(
            !reply.body.to_string().contains("\"userId\":20"),
            "{reply:?}"
        );
        api.get(&path, &alice).await.expect(200);
    }
    let listed = api.get("/v1/orders", &bob).await.expect(200);
    assert_eq!(listed.body["items"], json!([]));
    api.post(&format!("/v1/orders/{order}/cancel"), &bob, "c", &json!({}))
        .await
        .expect(404);
    assert_eq!(
        env.scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
            .await,
        1
    );

    let anonymous = api
        .send("GET", &format!("/v1/orders/{order}"), None, None, None)
        .await
        .expect(401);
    assert_eq!(anonymous.code(), "UNAUTHENTICATED");
    let forged = api
        .send(
            "GET",
            "/v1/orders",
            Some("eyJhbGciOiJub25lIn0.e30."),
            None,
            None,
        )
        .await
        .expect(401);
    assert_eq!(forged.code(), "INVALID_TOKEN");
    let deposit = api
        .post(
            &format!("/v1/accounts/{account}/deposits"),
            &alice,
            "d",
            &json!({"amountFen": 100}),
        )
        .await
        .expect(403);
    assert_eq!(deposit.code(), "FORBIDDEN");
    assert_eq!(env.scalar("SELECT count(*) FROM transfers").await, 0);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_stable_code_and_change_nothing() {
    let env = TestEnv::new(1).await;
    let mut settings = env.settings.clone();
    settings.api.max_body_bytes = 4096;
    let system = System::start(&env, &settings, NO_WORKERS).await;
    let api = &system.api;
    let token = api.token(30);
    let item = |price: serde_json::Value| json!([{"sku": "A", "qty": 1, "priceFen": price}]);
    let cases: Vec<(String, u16, &str)> = vec![
        ("{\"amountFen\": 100,".into(), 400, "MALFORMED_JSON"),
        ("[1, 2]".into(), 422, "INVALID_REQUEST"),
        (json!({"amountFen": "100", "items": item(json!(100))}).to_string(), 422, "INVALID_AMOUNT"),
        (json!({"amountFen": 0, "items": item(json!(0))}).to_string(), 422, "INVALID_AMOUNT"),
        (json!({"amountFen": -100, "items": item(json!(100))}).to_string(), 422, "INVALID_AMOUNT"),
        (json!({"amountFen": 1.5, "items": item(json!(1.5))}).to_string(), 422, "INVALID_AMOUNT"),
        ("{\"amountFen\": 9223372036854775808, \"items\": []}".into(), 422, "INVALID_AMOUNT"),
        ("{\"amountFen\": 1e30, \"items\": []}".into(), 422, "INVALID_AMOUNT"),
        (json!({"amountFen": 100, "currency": "XYZ", "items": item(json!(100))}).to_string(), 422, "UNSUPPORTED_CURRENCY"),
        (json!({"amountFen": 100, "currency": 156, "items": item(json!(100))}).to_string(), 422, "UNSUPPORTED_CURRENCY"),
        (json!({"amountFen": 100, "items": item(json!(99))}).to_string(), 422, "ITEMS_TOTAL_MISMATCH"),
        (json!({"amountFen": 100, "items": "many"}).to_string(), 422, "INVALID_FIELD"),
        (json!({"amountFen": 100, "items": [{"sku": 5, "qty": 1, "priceFen": 100}]}).to_string(), 422, "INVALID_FIELD"),
        (json!({"amountFen": 100, "items": item(json!(100)), "status": "PAID"}).to_string(), 422, "UNKNOWN_FIELD"),
        (json!({"amountFen": 100, "items": item(json!(100)), "balanceFen": 1}).to_string(), 422, "UNKNOWN_FIELD"),
        (json!({"amountFen": 100, "items": item(json!(100)), "userId": 31}).to_string(), 422, "UNKNOWN_FIELD"),
        (json!({"items": item(json!(100))}).to_string(), 422, "MISSING_FIELD"),
        (format!("{{\"amountFen\": 1, \"items\": [{{\"sku\": \"{}\", \"qty\": 1, \"priceFen\": 1}}]}}", "x".repeat(5000)), 413, "PAYLOAD_TOO_LARGE"),
    ];
    for (i, (body, status, code)) in cases.iter().enumerate() {
        let reply = api
            .send(
                "POST",
                "/v1/orders",
                Some(&token),
                Some(&format!("bad-{i}")),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (reply.status.as_u16(), reply.code()),
            (*status, *code),
            "body {body}: {reply:?}"
        );
        assert!(
            reply.body["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{reply:?}"
        );
    }
    // Accounts and deposits refuse the same way.
    let admin = api.admin_token();
    let account = api
        .post("/v1/accounts", &token, "open", &json!({"currency": "CNY"}))
        .await
        .expect(201)
        .id();
    for (path, tok, body, status, code) in [
        (
            "/v1/accounts".to_owned(),
            &token,
            json!({"currency": "CNY"}),
            409,
            "ACCOUNT_EXISTS",
        ),
        (
            "/v1/accounts".to_owned(),
            &token,
            json!({"currency": "CNY", "balanceFen": 1_000_000}),
            422,
            "UNKNOWN_FIELD",
        ),
        (
            "/v1/accounts".to_owned(),
            &token,
            json!({"currency": "cny"}),
            422,
            "UNSUPPORTED_CURRENCY",
        ),
        (
            format!("/v1/accounts/{account}/deposits"),
            &admin,
            json!({"amountFen": 0}),
            422,
            "INVALID_AMOUNT",
        ),
        (
            format!("/v1/accounts/{account}/deposits"),
            &admin,
            json!({"amountFen": 10, "accountId": 1}),
            422,
            "UNKNOWN_FIELD",
        ),
        (
            "/v1/accounts/999999/deposits".to_owned(),
            &admin,
            json!({"amountFen": 10}),
            404,
            "ACCOUNT_NOT_FOUND",
        ),
    ] {
        let reply = api.post(&path, tok, &format!("{path}-{body}"), &body).await;
        assert_eq!(
            (reply.status.as_u16(), reply.code()),
            (status, code),
            "{path} {body}: {reply:?}"
        );
    }
    // A system account's id names no account a deposit can go to.
    let settlement = env
        .scalar("INSERT INTO accounts (kind, currency, shard) VALUES ('SETTLEMENT', 'CNY', 0) RETURNING id")
        .await;
    let reply = api
        .post(
            &format!("/v1/accounts/{settlement}/deposits"),
            &admin,
            "to-settlement",
            &json!({"amountFen": 10}),
        )
        .await;
    assert_eq!(
        (reply.status.as_u16(), reply.code()),
        (404, "ACCOUNT_NOT_FOUND"),
        "{reply:?}"
    );
    for (method, path, status, code) in [
        ("GET", "/v1/orders/abc", 404, "ORDER_NOT_FOUND"),
        ("GET", "/v1/orders?status=LOST", 400, "INVALID_QUERY"),
        ("GET", "/v1/orders?limit=0", 400, "INVALID_QUERY"),
        ("GET", "/v1/nowhere", 404, "NOT_FOUND"),
        ("DELETE", "/v1/orders", 405, "METHOD_NOT_ALLOWED"),
    ] {
        let reply = api.send(method, path, Some(&token), None, None).await;
        assert_eq!(
            (reply.status.as_u16(), reply.code()),
            (status, code),
            "{method} {path}: {reply:?}"
        );
    }
    assert_eq!(env.scalar("SELECT count(*) FROM orders").await, 0);
    assert_eq!(env.scalar("SELECT count(*) FROM transfers").await, 0);
    assert_eq!(env.scalar("SELECT count(*) FROM outbox").await, 0);
    // The user's account and the settlement account inserted above.
    assert_eq!(env.scalar("SELECT count(*) FROM accounts").await, 2);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_listed_newest_first_in_pages_and_filtered_by_status() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, NO_WORKERS).await;
    let api = &system.api;
    let token = api.token(40);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            api.place_order(40, &format!("o-{i}"), 100 + i)
                .await
                .expect(201)
                .id(),
        );
    }
    api.post(
        &format!("/v1/orders/{}/cancel", ids[1]),
        &token,
        "c",
        &json!({}),
    )
    .await
    .expect(200);

    let mut seen = Vec::new();
    let mut path = "/v1/orders?limit=2".to_owned();
    loop {
        let page = api.get(&path, &token).await.expect(200).body;
        seen.extend(
            page["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|o| o["id"].as_i64().expect("id")),
        );
        match page["nextCursor"].as_str() {
            Some(cursor) => path = format!("/v1/orders?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids);
    let cancelled = api
        .get("/v1/orders?status=CANCELLED", &token)
        .await
        .expect(200)
        .body;
    assert_eq!(cancelled["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(cancelled["items"][0]["cancelReason"], "USER_REQUESTED");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_the_rate_limit_gets_429_and_other_users_do_not() {
    let env = TestEnv::new(1).await;
    let mut settings = env.settings.clone();
    settings.api.rate_limit_per_s = 0.001;
    settings.api.rate_limit_burst = 3.0;
    let system = System::start(&env, &settings, NO_WORKERS).await;
    let api = &system.api;
    for _ in 0..3 {
        api.get("/v1/orders", &api.token(50)).await.expect(200);
    }
    assert_eq!(
        api.get("/v1/orders", &api.token(50))
            .await
            .expect(429)
            .code(),
        "RATE_LIMITED"
    );
    api.get("/v1/orders", &api.token(51)).await.expect(200);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_openapi_document_is_the_committed_one_and_covers_every_route() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, NO_WORKERS).await;
    let served = system
        .api
        .send("GET", "/openapi.json", None, None, None)
        .await
        .expect(200)
        .body;
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json"),
        )
        .expect("read"),
    )
    .expect("committed document is JSON");
    assert_eq!(served, committed);
    assert_eq!(
        served["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
    for (path, method) in [
        ("/v1/accounts", "post"),
        ("/v1/accounts/{id}", "get"),
        ("/v1/accounts/{id}/entries", "get"),
        ("/v1/accounts/{id}/deposits", "post"),
        ("/v1/orders", "post"),
        ("/v1/orders", "get"),
        ("/v1/orders/{id}", "get"),
        ("/v1/orders/{id}/cancel", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            served["paths"][path][method].is_object(),
            "{method} {path} is not documented"
        );
    }
    system.stop().await;
}

/// A request that runs past the timeout is abandoned whole: its transaction rolls back, no
/// key is kept, and the same key works once the obstacle is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_timeout_is_abandoned_and_leaves_nothing_behind() {
    let env = TestEnv::new(1).await;
    let mut settings = env.settings.clone();
    settings.api.request_timeout_ms = 500;
    let system = System::start(&env, &settings, NO_WORKERS).await;
    let api = &system.api;
    let id = api.place_order(60, "o", 100).await.expect(201).id();

    // Another transaction holds the order row, so the cancel waits on it past the timeout.
    let mut blocker = env.pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM orders WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *blocker)
        .await
        .expect("lock");
    let path = format!("/v1/orders/{id}/cancel");
    let timed_out = api
        .post(&path, &api.token(60), "cancel", &json!({}))
        .await
        .expect(503);
    assert_eq!(timed_out.code(), "REQUEST_TIMEOUT");
    blocker.rollback().await.expect("release");

    assert_eq!(
        env.scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
            .await,
        1
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM idempotency_keys WHERE key = 'cancel'")
            .await,
        0
    );
    assert_eq!(
        env.scalar("SELECT count(*) FROM outbox").await,
        1,
        "only the OrderCreated"
    );
    let retried = api
        .post(&path, &api.token(60), "cancel", &json!({}))
        .await
        .expect(200);
    assert!(!retried.replayed);
    assert_eq!(retried.body["status"], "CANCELLED");
    system.stop().await;
}

/// Reads one sample (`name` with exactly these labels) from a Prometheus text page.
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// Reads the sample of `name` whose labels include all of `labels`, in any order.
fn sample_with(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    page.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_and_show_the_outbox_and_pending_orders() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, NO_WORKERS).await;
    let api = &system.api;
    api.place_order(80, "a", 100).await.expect(201);
    api.place_order(80, "b", 200).await.expect(201);
    api.place_order(80, "b", 200).await.expect(201);
    api.place_order(80, "c", 0).await.expect(422);
    let page = api
        .send("GET", "/metrics", None, None, None)
        .await
        .expect(200)
        .body;
    let page = page.as_str().expect("text");
    let created = r#"paystream_http_requests_total{method="POST",route="/v1/orders",status="201"}"#;
    assert_eq!(sample(page, created), 3.0, "{page}");
    let refused = r#"paystream_http_requests_total{method="POST",route="/v1/orders",status="422"}"#;
    assert_eq!(sample(page, refused), 1.0);
    assert_eq!(
        sample(page, r#"paystream_idempotency_total{result="replayed"}"#),
        1.0
    );
    // Two orders, nothing relayed or paid: two unpublished OrderCreated, two PENDING orders.
    assert_eq!(sample(page, "paystream_outbox_backlog"), 2.0);
    assert_eq!(sample(page, "paystream_orders_pending"), 2.0);
    assert!(sample(page, "paystream_oldest_pending_order_age_seconds") >= 0.0);
    system.stop().await;
}

/// `/readyz` answers for the database: unreachable, it says 503 NOT_READY; back, 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_database_is_down_and_recovers_after() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, NO_WORKERS).await;
    let api = &system.api;
    api.send("GET", "/readyz", None, None, None)
        .await
        .expect(200);
    assert_eq!(
        api.send("GET", "/healthz", None, None, None)
            .await
            .expect(200)
            .body["status"],
        "ok"
    );

    // Take this test's database away: no new connections, existing ones killed.
    let db = env
        .database_url
        .rsplit('/')
        .next()
        .expect("db name")
        .to_owned();
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url())
        .await
        .expect("admin");
    sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"))
        .execute(&mut admin)
        .await
        .expect("close db");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
        .bind(&db)
        .execute(&mut admin)
        .await
        .expect("terminate");
    let down = api
        .send("GET", "/readyz", None, None, None)
        .await
        .expect(503);
    assert_eq!(down.code(), "NOT_READY");
    assert!(
        down.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("database")),
        "{down:?}"
    );
    assert_eq!(
        api.send("GET", "/healthz", None, None, None)
            .await
            .status
            .as_u16(),
        200,
        "alive even so"
    );

    sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
        .execute(&mut admin)
        .await
        .expect("reopen db");
    wait_until("ready again", || async {
        (api.send("GET", "/readyz", None, None, None)
            .await
            .status
            .as_u16()
            == 200)
            .then_some(())
    })
    .await;
    system.stop().await;
}

/// A known workload through both processors moves their counters by exactly that much.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_a_known_workload_through_both_processors() {
    let env = TestEnv::new(2).await;
    let system = System::start(&env, &env.settings, Parts::ALL).await;
    let api = &system.api;
    api.funded_account(90, 1_000).await;
    let paid: Vec<i64> = vec![
        api.place_order(90, "a", 300).await.expect(201).id(),
        api.place_order(90, "b", 300).await.expect(201).id(),
    ];
    let refused = api.place_order(90, "c", 5_000).await.expect(201).id();
    for id in paid {
        api.wait_order(90, id, "PAID").await;
    }
    api.wait_order(90, refused, "CANCELLED").await;
    wait_until(
        "the workers to hold their partitions and report no lag",
        || async {
            let page = api
                .send("GET", "/metrics", None, None, None)
                .await
                .body
                .as_str()
                .unwrap_or("")
                .to_owned();
            let held = sample_with(
                &page,
                "paystream_assigned_partitions",
                &[("processor", "account")],
            ) == 2.0
                && sample_with(
                    &page,
                    "paystream_assigned_partitions",
                    &[("processor", "order")],
                ) == 2.0;
            let lagging = page
                .lines()
                .any(|l| l.starts_with("paystream_consumer_lag_messages{") && !l.ends_with(" 0"));
            (held && !lagging && page.contains("paystream_consumer_lag_messages{")).then_some(())
        },
    )
    .await;
    let page = api
        .send("GET", "/metrics", None, None, None)
        .await
        .body
        .as_str()
        .unwrap_or("")
        .to_owned();
    let orders = env.settings.topics.order_events.as_str();
    let accounts = env.settings.topics.account_events.as_str();
    let consumed = |processor: &str, topic: &str, outcome: &str| {
        sample_with(
            &page,
            "paystream_events_consumed_total",
            &[
                ("processor", processor),
                ("topic", topic),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(consumed("account", orders, "applied"), 2.0, "{page}");
    assert_eq!(consumed("account", orders, "business_failure"), 1.0);
    assert_eq!(consumed("account", orders, "dead_lettered"), 0.0);
    // Two debits and one failure moved orders; the deposit's AccountCredited is not for them.
    assert_eq!(consumed("order", accounts, "applied"), 3.0);
    assert_eq!(consumed("order", accounts, "ignored"), 1.0);
    assert_eq!(sample(&page, "paystream_orders_pending"), 0.0);
    paystream_processors::audit::count_orders(&env.pool)
        .await
        .expect("count");
    let page = api
        .send("GET", "/metrics", None, None, None)
        .await
        .body
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert_eq!(
        sample_with(&page, "paystream_orders", &[("status", "PAID")]),
        2.0
    );
    assert_eq!(
        sample_with(&page, "paystream_orders", &[("status", "CANCELLED")]),
        1.0
    );
    assert!(
        sample_with(
            &page,
            "paystream_relay_published_total",
            &[("topic", orders)]
        ) >= 5.0,
        "3 created, 2 paid, 1 cancelled"
    );
    api.send("GET", "/readyz", None, None, None)
        .await
        .expect(200);
    system.stop().await;
}

/// A body that names a key twice says two things; which one serde_json kept was a parser
/// detail that a proxy or an audit log reading the same bytes may decide the other way. It
/// is refused with 400 DUPLICATE_JSON_KEY, at any depth, and no money moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_naming_a_key_twice_is_refused_and_moves_no_money() {
    let env = TestEnv::new(1).await;
    let system = System::start(&env, &env.settings, Parts::ALL).await;
    let api = &system.api;
    let account = api.funded_account(32, 10_000).await;
    let token = api.token(32);
    let item = r#"{"sku": "A", "qty": 1, "priceFen": 100}"#;
    let bodies = [
        format!(r#"{{"amountFen": 100, "amountFen": 9000, "currency": "CNY", "items": [{item}]}}"#),
        format!(r#"{{"amountFen": 100, "currency": "CNY", "currency": "USD", "items": [{item}]}}"#),
        r#"{"amountFen": 100, "currency": "CNY", "items": [{"sku": "A", "qty": 1, "priceFen": 100, "priceFen": 1}]}"#.to_owned(),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let reply = api
            .send(
                "POST",
                "/v1/orders",
                Some(&token),
                Some(&format!("dup-{i}")),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (reply.status.as_u16(), reply.code()),
            (400, "DUPLICATE_JSON_KEY"),
            "{body}: {reply:?}"
        );
    }
    let deposit = api
        .send(
            "POST",
            &format!("/v1/accounts/{account}/deposits"),
            Some(&api.admin_token()),
            Some("dup-deposit"),
            Some(r#"{"amountFen": 1, "amountFen": 1000000}"#.to_owned()),
        )
        .await;
    assert_eq!(
        (deposit.status.as_u16(), deposit.code()),
        (400, "DUPLICATE_JSON_KEY"),
        "{deposit:?}"
    );

    let orders = api.get("/v1/orders", &token).await.expect(200);
    assert_eq!(
        orders.body["items"].as_array().map(Vec::len),
        Some(0),
        "{orders:?}"
    );
    assert_eq!(api.balance(32, account).await, 10_000, "no money moved");
    system.stop().await;
}
