//! `paystream audit`: reconciliation against SPEC §6, as a report and an exit code.

use anyhow::Context as _;
use paystream_processors::db::Pool;
use paystream_processors::settings::Settings;

/// Checks every invariant; prints the report and exits with 2 when any is violated.
pub async fn run(settings: &Settings, pool: &Pool, json: bool) -> anyhow::Result<()> {
    let limits = paystream_processors::audit::Limits::running(settings);
    let mut violations = paystream_processors::audit::check(pool, &limits)
        .await
        .context("Failed to run the audit")?;
    violations.extend(
        paystream_processors::audit::check_offsets(pool, settings)
            .await
            .context("Failed to check stored offsets against the broker")?,
    );
    let checks = paystream_processors::audit::CHECK_COUNT + 1;
    if json {
        let report = serde_json::json!({
            "ok": violations.is_empty(),
            "checks": checks,
            "checkedAt": chrono::Utc::now(),
            "violations": violations,
        });
        println!("{report}");
    } else if violations.is_empty() {
        println!("audit: all {checks} checks hold");
    } else {
        println!(
            "audit: {} violation(s) across {checks} checks",
            violations.len()
        );
        for v in &violations {
            println!("  [{}] {}", v.invariant, v.detail);
        }
    }
    if !violations.is_empty() {
        std::process::exit(2);
    }
    Ok(())
}
