//! `paystream up` as a user runs it: one process, then the curl session it prints, pasted
//! into a shell.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::http::Client;
use common::*;
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
    let mut child = env.spawn_child_piped(&["up"], &[("PAYSTREAM__API__LISTEN", &listen), ("PAYSTREAM__API__PUBLIC_URL", &url)]);
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
    tokio::time::timeout(DEADLINE, read).await.expect("paystream up printed its session");
    let text = printed.join("\n");
    assert!(text.contains("paystream is up"), "{text}");
    assert!(text.contains(&format!("{url}/metrics")), "{text}");
    let session: String = printed.iter().skip_while(|l| !l.starts_with("export API=")).cloned().collect::<Vec<_>>().join("\n");
    assert!(!session.is_empty(), "no curl session in:\n{text}");

    let output = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!("set -e\n{session}"))
        .stdout(Stdio::piped())
        .output()
        .await
        .expect("run the session");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "session failed: {out}");
    assert!(out.contains("account 1") && out.contains("order 1"), "{out}");

    // The session deposited 10000, ordered 2500 and cancelled: the money comes back.
    let api = Client::new(url.clone(), &env.settings.api.jwt_secret);
    wait_until("the cancelled order's money back", || async {
        let order = api.order(1001, 1).await;
        let settled = order["status"] == "REFUNDED" || (order["status"] == "CANCELLED" && order["paidAt"].is_null());
        (settled && api.balance(1001, 1).await == 10_000).then_some(())
    })
    .await;
    assert!(api.send("GET", "/metrics", None, None, None).await.body.as_str().is_some_and(|m| m.contains("paystream_http_requests_total")));

    let pid = child.id().expect("pid").to_string();
    let killed = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.expect("exits").expect("wait");
    assert!(status.success(), "paystream up exited with {status}");
    env.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paystream_audit_exits_zero_on_a_clean_ledger_and_two_with_a_report_when_a_balance_is_altered() {
    let env = TestEnv::new(1).await;
    let account = env.funded_account(70, 5_000).await;
    let clean = env.spawn_child_piped(&["audit"], &[]).wait_with_output().await.expect("audit runs");
    assert_eq!(clean.status.code(), Some(0), "{}", String::from_utf8_lossy(&clean.stdout));

    // An edit behind the application's back: the balance no longer matches the ledger.
    sqlx::query("UPDATE accounts SET balance_fen = balance_fen + 1 WHERE id = $1")
        .bind(account)
        .execute(&env.pool)
        .await
        .expect("tamper");
    let tampered = env.spawn_child_piped(&["audit", "--json"], &[]).wait_with_output().await.expect("audit runs");
    assert_eq!(tampered.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&tampered.stdout).expect("JSON report");
    assert_eq!(report["ok"], false);
    let invariants: Vec<&str> = report["violations"].as_array().expect("violations").iter().filter_map(|v| v["invariant"].as_str()).collect();
    assert!(invariants.contains(&"balance_equals_sum_of_entries"), "{report}");
    assert!(invariants.contains(&"money_is_conserved_per_currency"), "{report}");
}
