//! `paystream up`: everything in one process for a laptop, and a session to paste.

use std::time::Duration;

use anyhow::Context as _;
use paystream_processors::accounts::store;
use paystream_processors::db::Pool;
use paystream_processors::settings::{ApiSettings, Settings};
use paystream_processors::startup;
use paystream_processors::{api, kafka};

/// Migrates, creates the topics, starts every part and prints where to look, then runs until
/// a shutdown signal.
pub async fn run(settings: &Settings, pool: &Pool) -> anyhow::Result<()> {
    // A laptop: the published development key is fine here (it is printed in the session).
    let settings = &Settings {
        api: ApiSettings {
            development: true,
            ..settings.api.clone()
        },
        ..settings.clone()
    };
    crate::migrate(pool).await?;
    kafka::create_topics(settings).await?;
    let listener = tokio::net::TcpListener::bind(&settings.api.listen)
        .await
        .with_context(|| format!("Failed to listen on {}", settings.api.listen))?;
    // The printed session opens an account, so it is for a user who has none yet: it can be
    // pasted again after every start, on the same database.
    let demo_user = store::first_user_without_account(pool).await?;
    let running = startup::start(startup::EVERYTHING, settings, pool, Some(listener))?;
    print_welcome(settings, demo_user);
    running
        .run_until(crate::shutdown_signal(), crate::SHUTDOWN_GRACE)
        .await
}

/// What `paystream up` prints once everything runs: where to look, and a session to paste.
fn print_welcome(settings: &Settings, user_id: i64) {
    let url = settings.api.public_url.trim_end_matches('/');
    let day = Duration::from_secs(24 * 3600);
    let (user, admin) = match (
        api::auth::mint(&settings.api.jwt_secret, user_id, false, day),
        api::auth::mint(&settings.api.jwt_secret, 1, true, day),
    ) {
        (Ok(user), Ok(admin)) => (user, admin),
        _ => return,
    };
    println!(
        r#"paystream is up (ctrl-c to stop)
  API:     {url}/v1   (OpenAPI: {url}/openapi.json)
  Metrics: {url}/metrics   Health: {url}/healthz   Ready: {url}/readyz

Try it — user {user_id} opens an account, an admin deposits, user {user_id} orders and cancels:

export API={url} TOKEN={user} ADMIN={admin}
ACCOUNT=$(curl -s -X POST $API/v1/accounts -H "Authorization: Bearer $TOKEN" -H "Idempotency-Key: acct-{user_id}" -d '{{"currency":"CNY"}}' | grep -o '"id":[0-9]*' | cut -d: -f2); echo "account $ACCOUNT"
curl -s -X POST $API/v1/accounts/$ACCOUNT/deposits -H "Authorization: Bearer $ADMIN" -H "Idempotency-Key: dep-{user_id}" -d '{{"amountFen":10000}}'; echo
ORDER=$(curl -s -X POST $API/v1/orders -H "Authorization: Bearer $TOKEN" -H "Idempotency-Key: order-{user_id}" -d '{{"amountFen":2500,"currency":"CNY","items":[{{"sku":"tea","qty":1,"priceFen":2500}}]}}' | grep -o '"id":[0-9]*' | cut -d: -f2); echo "order $ORDER"
for i in $(seq 50); do curl -s $API/v1/orders/$ORDER -H "Authorization: Bearer $TOKEN" | grep -q '"status":"PAID"' && break; sleep 0.1; done
curl -s $API/v1/orders/$ORDER -H "Authorization: Bearer $TOKEN"; echo
curl -s -X POST $API/v1/orders/$ORDER/cancel -H "Authorization: Bearer $TOKEN" -H "Idempotency-Key: cancel-{user_id}"; echo
for i in $(seq 50); do curl -s $API/v1/orders/$ORDER -H "Authorization: Bearer $TOKEN" | grep -q '"status":"REFUNDED"' && break; sleep 0.1; done
curl -s $API/v1/orders/$ORDER -H "Authorization: Bearer $TOKEN"; echo
curl -s "$API/v1/accounts/$ACCOUNT/entries" -H "Authorization: Bearer $TOKEN"; echo"#
    );
}
