//! `paystream up` as a user runs it: one process, then the curl session it prints, pasted
//! into a shell.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::http::Client;
use common::*;
use sqlx::Connection as _;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paystream_up_runs_everything_and_its_printed_curl_session_works() {
    let env = TestEnv::new(2).await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let mut child = env.spawn_child_piped(
        &["up"],
        &[
            ("PAYSTREAM__API__LISTEN", &listen),
            ("PAYSTREAM__API__PUBLIC_URL", &url),
        ],
    );
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();

    // Everything up to the end of the printed session.
    let mut printed = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            let done = line.contains("/entries");
            printed.push(line);
            if done {
                break;
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("paystream up printed its session");
    let text = printed.join("\n");
    assert!(text.contains("paystream is up"), "{text}");
    assert!(text.contains(&format!("{url}/metrics")), "{text}");
    let session: String = printed
        .iter()
        .skip_while(|l| !l.starts_with("export API="))
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!session.is_empty(), "no curl session in:\n{text}");

    // A fresh database: the first user id after the 1000s.
    assert!(text.contains("Try it — user 1001 opens"), "{text}");
    let output = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!("set -e\n{session}"))
        .stdout(Stdio::piped())
        .output()
        .await
        .expect("run the session");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "session failed: {out}");
    assert!(
        out.contains("account 1") && out.contains("order 1"),
        "{out}"
    );

    // The session deposited 10000, ordered 2500 and cancelled: the money comes back.
    let api = Client::new(url.clone(), &env.settings.api.jwt_secret);
    wait_until("the cancelled order's money back", || async {
        let order = api.order(1001, 1).await;
        let settled = order["status"] == "REFUNDED"
            || (order["status"] == "CANCELLED" && order["paidAt"].is_null());
        (settled && api.balance(1001, 1).await == 10_000).then_some(())
    })
    .await;
    assert!(api
        .send("GET", "/metrics", None, None, None)
        .await
        .body
        .as_str()
        .is_some_and(|m| m.contains("paystream_http_requests_total")));

    let pid = child.id().expect("pid").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert!(status.success(), "paystream up exited with {status}");
    env.assert_invariants().await;
}

/// Runs `paystream audit --json` on `env`'s database: exit code and the invariants named.
async fn audit(env: &TestEnv) -> (Option<i32>, Vec<String>) {
    let out = env
        .spawn_child_piped(&["audit", "--json"], &[("PAYSTREAM__AUDIT__SETTLE_S", "0")])
        .wait_with_output()
        .await
        .expect("audit runs");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["ok"], out.status.code() == Some(0), "{report}");
    let named = report["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .filter_map(|v| v["invariant"].as_str().map(str::to_owned))
        .collect();
    (out.status.code(), named)
}

async fn exec(env: &TestEnv, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Edits made behind the application's back, each on a clean ledger of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paystream_audit_passes_a_clean_ledger_and_names_each_injected_violation() {
    const UNLOCK: &str = "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only;";
    const LAST_ENTRY: &str = "(SELECT max(id) FROM ledger_entries WHERE delta_fen > 0)";
    let cases: [(&str, String, &str); 10] = [
        ("a balance changed directly", "UPDATE accounts SET balance_fen = balance_fen + 1 WHERE kind = 'USER';".into(), "balance_equals_sum_of_entries"),
        (
            "an entry altered, its balance fixed up to match",
            format!("{UNLOCK} UPDATE ledger_entries SET delta_fen = delta_fen + 1, balance_after_fen = balance_after_fen + 1 WHERE id = {LAST_ENTRY}; \
                     UPDATE accounts SET balance_fen = balance_fen + 1 WHERE kind = 'USER';"),
            "ledger_hash_chains_are_intact",
        ),
        (
            "only a recorded balance-after rewritten",
            format!("{UNLOCK} UPDATE ledger_entries SET balance_after_fen = balance_after_fen + 100 WHERE id = {LAST_ENTRY};"),
            "ledger_hash_chains_are_intact",
        ),
        (
            "an entry moved to an account that does not exist",
            format!("{UNLOCK} UPDATE ledger_entries SET account_id = account_id + 1000000 WHERE id = {LAST_ENTRY};"),
            "ledger_references_exist",
        ),
        (
            "a second debit row for a paid order",
            "DROP INDEX transfers_one_debit_and_one_refund_per_order; \
             INSERT INTO transfers (kind, order_id, from_account_id, to_account_id, amount_fen, currency) \
             SELECT 'DEBIT', o.id, t.from_account_id, t.to_account_id, t.amount_fen, t.currency \
             FROM orders o JOIN transfers t ON t.order_id = o.id AND t.kind = 'DEBIT';"
                .into(),
            "order_state_matches_its_transfers",
        ),
        (
            "a debited order's amount changed",
            "UPDATE orders SET amount_fen = amount_fen + 1;".into(),
            "money_moves_only_for_its_order",
        ),
        (
            "a debited order deleted",
            "DELETE FROM orders;".into(),
            "money_moves_only_for_its_order",
        ),
        (
            "a stored offset moved past the end of the log",
            "UPDATE consumer_offsets SET next_offset = next_offset + 1000 WHERE partition = 0 AND consumer_group LIKE '%-account';".into(),
            "stored_offsets_within_the_log",
        ),
        (
            "a stored offset whose message is not the one the group applied (a recreated topic)",
            "UPDATE consumer_offsets SET last_message_fp = last_message_fp # 1 WHERE last_message_fp IS NOT NULL;".into(),
            "stored_offsets_match_the_log",
        ),
        (
            "a stored offset for a topic the broker does not have",
            "UPDATE consumer_offsets SET topic = topic || '.gone' WHERE partition = 0 AND consumer_group LIKE '%-account';".into(),
            "stored_offsets_within_the_log",
        ),
    ];
    for (what, sql, invariant) in cases {
        let env = TestEnv::new(1).await;
        let parts = common::http::Parts::ALL;
        let system = common::http::System::start(&env, &env.settings, parts).await;
        system.api.funded_account(70, 5_000).await;
        let id = system
            .api
            .place_order(70, "o", 1_200)
            .await
            .expect(201)
            .id();
        system.api.wait_order(70, id, "PAID").await;
        system.stop().await;
        assert_eq!(
            audit(&env).await,
            (Some(0), vec![]),
            "clean ledger before: {what}"
        );

        exec(&env, &sql).await;
        let (code, named) = audit(&env).await;
        assert_eq!(code, Some(2), "{what}");
        assert!(
            named.iter().any(|n| n == invariant),
            "{what}: expected {invariant}, got {named:?}"
        );
    }
}

/// The ledger's references are checked by the database on every insert, once per statement
/// (migration 0011), and the rows they refer to cannot be removed or renumbered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_ledger_rows_that_refer_to_nothing_and_removing_what_they_refer_to() {
    let env = TestEnv::new(1).await;
    let account = env.funded_account(90, 1_000).await;
    let transfer = env.scalar("SELECT max(id) FROM transfers").await;
    let refused = [
        (
            "a transfer to an account that does not exist",
            format!("INSERT INTO transfers (kind, from_account_id, to_account_id, amount_fen, currency) \
                     VALUES ('DEPOSIT', {account}, {account} + 1000, 1, 'CNY')"),
            "23503",
        ),
        (
            "an entry of a transfer that does not exist",
            format!("INSERT INTO ledger_entries (transfer_id, account_id, delta_fen, balance_after_fen, entry_hash) \
                     VALUES ({transfer} + 1000, {account}, 1, 1, sha256(''::bytea))"),
            "23503",
        ),
        (
            "an entry of an account that does not exist, among good ones",
            format!("INSERT INTO ledger_entries (transfer_id, account_id, delta_fen, balance_after_fen, entry_hash) \
                     SELECT {transfer}, {account} + i, 1, 1, sha256(''::bytea) FROM generate_series(0, 2) i"),
            "23503",
        ),
        ("deleting an account", format!("DELETE FROM accounts WHERE id = {account}"), "P0001"),
        ("renumbering an account", format!("UPDATE accounts SET id = id + 1000 WHERE id = {account}"), "P0001"),
        ("emptying the accounts", "TRUNCATE accounts CASCADE".into(), "P0001"),
    ];
    for (what, sql, code) in refused {
        let error = sqlx::query(&sql).execute(&env.pool).await.expect_err(what);
        let db = error.as_database_error().expect("a database error");
        assert_eq!(db.code().as_deref(), Some(code), "{what}: {db}");
    }
    // What the application writes still goes in, and nothing refused changed the ledger.
    env.deposit(account, 500).await;
    assert_eq!(env.balance(account).await, 1_500);
    env.assert_invariants().await;
}

/// Some brokers report a partition's high watermark at the start of its last record batch
/// (tansu 0.6 answers ListOffsets(latest) with that batch's base offset + 1). An offset at
/// the end of such a batch is inside the log; the audit must read the log to tell, not
/// call it a violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paystream_audit_accepts_a_stored_offset_at_the_end_of_a_multi_record_batch() {
    const ORDERS: i64 = 5;
    let env = TestEnv::new(1).await;
    env.funded_account(80, 10_000).await;
    let orders: Vec<(i64, i64, i64)> = (1..=ORDERS).map(|order| (order, 80, 100)).collect();
    env.record_orders(&orders).await;
    // One record batch: the producer holds the sends until the batch is flushed.
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.settings.kafka.brokers)
        .set("linger.ms", "60000")
        .create()
        .expect("producer");
    let sends: Vec<_> = (1..=ORDERS)
        .map(|order| {
            let value = order_created(uuid::Uuid::new_v4(), order, 80, 100);
            let record = rdkafka::producer::FutureRecord::to(&env.settings.topics.order_events)
                .key("80")
                .payload(&value);
            producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("queued")
        })
        .collect();
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30)).expect("flushed");
    for send in sends {
        send.await.expect("delivered").expect("acknowledged");
    }
    let worker = env.spawn_account_processor(env.settings.clone());
    env.wait_consumed(ORDERS).await;
    worker.stop().await;

    assert_eq!(audit(&env).await, (Some(0), vec![]));
}

/// A consumer group that stopped moving while messages wait is a stall: correct but stopped
/// is an outage, and `paystream audit` says so (it used to exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paystream_audit_names_a_consumer_group_that_stopped_moving_while_messages_wait() {
    let env = TestEnv::new(1).await;
    let producer = env.producer();
    for order in 1..=3 {
        let value = order_created(uuid::Uuid::new_v4(), order, 81, 100);
        env.produce(&producer, "81", &value).await;
    }
    let topic = &env.settings.topics.order_events;
    // One group idle for ten minutes with the messages waiting, one that just moved.
    exec(
        &env,
        &format!(
            "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset, epoch, owner, updated_at) VALUES \
             ('stalled-group', '{topic}', 0, 1, 1, 'gone', now() - interval '10 minutes'), \
             ('moving-group', '{topic}', 0, 1, 1, 'here', now())"
        ),
    )
    .await;
    let (code, named) = audit(&env).await;
    assert_eq!(code, Some(2));
    assert_eq!(named, vec!["consumer_groups_make_progress".to_owned()]);
}

/// A command that meets a database nobody migrated says so in one line and names the command
/// that fixes it; it used to print a stack backtrace of "relation accounts does not exist".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_on_an_unmigrated_database_says_to_run_migrate_without_a_backtrace() {
    let env = TestEnv::new(1).await;
    let empty = format!(
        "{}_empty",
        env.database_url.rsplit('/').next().expect("name")
    );
    exec(&env, &format!("CREATE DATABASE {empty}")).await;
    let url = format!(
        "{}/{empty}",
        env.database_url.rsplit_once('/').expect("url").0
    );
    let out = env
        .spawn_child_logged(
            &["audit"],
            &[("PAYSTREAM__DATABASE__URL", &url), ("RUST_BACKTRACE", "1")],
        )
        .wait_with_output()
        .await
        .expect("audit runs");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("run `paystream migrate`"), "{log}");
    assert!(!log.contains("backtrace"), "{log}");
    exec(&env, &format!("DROP DATABASE {empty} WITH (FORCE)")).await;
}

/// The published signing keys (the committed default, docker-compose's placeholder) let
/// anyone mint admin tokens: `paystream api` refuses them and says what to set, unless it is
/// told it runs on a laptop (`api.development`, which `paystream up` sets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_to_start_with_a_published_signing_key_outside_development_mode() {
    let env = TestEnv::new(1).await;
    let published = [
        "paystream-dev-secret-do-not-use-in-production",
        "change-me-change-me-change-me",
    ];
    for key in published {
        let child = env.spawn_child_logged(
            &["api"],
            &[
                ("PAYSTREAM__API__JWT_SECRET", key),
                ("PAYSTREAM__API__LISTEN", "127.0.0.1:0"),
            ],
        );
        let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
            .await
            .expect("paystream api exits")
            .expect("wait");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}: {log}");
        assert!(
            log.contains("published development key") && log.contains("PAYSTREAM__API__JWT_SECRET"),
            "{key}: {log}"
        );
    }

    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr").port()
    };
    let listen = format!("127.0.0.1:{port}");
    let _api = env.spawn_child(
        &["api"],
        &[
            ("PAYSTREAM__API__JWT_SECRET", published[0]),
            ("PAYSTREAM__API__DEVELOPMENT", "true"),
            ("PAYSTREAM__API__LISTEN", &listen),
        ],
    );
    let api = Client::new(format!("http://{listen}"), published[0]);
    let token = api.token(5);
    wait_until(
        "the API in development mode to take its own tokens",
        || async {
            // Refused connections until it listens.
            let reply = reqwest::Client::new()
                .get(format!("http://{listen}/v1/orders"))
                .bearer_auth(&token)
                .send()
                .await;
            reply.ok().filter(|r| r.status() == 200).map(drop)
        },
    )
    .await;
}

/// Two `paystream migrate` at once on a fresh database (two replicas' init containers, say)
/// both succeed and leave every index valid. Migration 0006 builds an index CONCURRENTLY,
/// which waits for every open snapshot, and the second migrator used to wait for the
/// migration lock inside a statement: the deadlock detector aborted one of them, possibly
/// the index build, leaving an INVALID index behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_migrations_run_at_once_both_succeed_and_leave_every_index_valid() {
    let env = TestEnv::new(1).await;
    let base = env.database_url.rsplit_once('/').expect("url").0.to_owned();
    let name = env
        .database_url
        .rsplit('/')
        .next()
        .expect("name")
        .to_owned();
    for round in 0..3 {
        let fresh = format!("{name}_migrate_{round}");
        exec(&env, &format!("CREATE DATABASE {fresh}")).await;
        let url = format!("{base}/{fresh}");
        let migrators: Vec<_> = (0..2)
            .map(|_| {
                env.spawn_child_logged(&["migrate"], &[("PAYSTREAM__DATABASE__URL", &url)])
                    .wait_with_output()
            })
            .collect();
        for out in futures::future::join_all(migrators).await {
            let out = out.expect("migrate runs");
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "round {round}: {log}");
        }
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        let (applied, invalid): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM _sqlx_migrations WHERE success), \
                    (SELECT count(*) FROM pg_index WHERE NOT indisvalid)",
        )
        .fetch_one(&mut conn)
        .await
        .expect("read the schema");
        drop(conn);
        assert_eq!(
            (applied, invalid),
            (paystream_processors::db::MIGRATOR.iter().count() as i64, 0),
            "round {round}"
        );
        exec(&env, &format!("DROP DATABASE {fresh} WITH (FORCE)")).await;
    }
}
