//! `/v1/accounts`: open an account, read it, page through its ledger, deposit (admin).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgConnection;

use super::auth::Caller;
use super::body::{Fields, JsonBody};
use super::error::ApiError;
use super::idempotency::IdempotentRequest;
use super::{begin, finish, only_query_params, path_id, AppState, Begun, Page};
use crate::accounts::store;
use crate::ledger::PostError;

#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
struct AccountView {
    id: i64,
    user_id: i64,
    currency: String,
    status: String,
    balance_fen: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const ACCOUNT_COLUMNS: &str = "id, user_id, currency, status, balance_fen, created_at, updated_at";

#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
struct EntryView {
    id: i64,
    transfer_id: i64,
    kind: String,
    order_id: Option<i64>,
    delta_fen: i64,
    balance_after_fen: i64,
    reference: Option<String>,
    created_at: DateTime<Utc>,
}

pub async fn open(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let request = IdempotentRequest::new(&headers, caller.user_id, "POST", "/v1/accounts", &body)?;
    let fields = Fields::new(&body, &["currency"])?;
    let currency = fields.currency("currency", &state.settings.api.currencies, None)?;
    let mut tx = match begin(&state, &request).await? {
        Begun::Replay(response) => return Ok(response),
        Begun::Fresh(tx) => tx,
    };
    let done = async {
        let created = store::create_user_account(&mut tx, caller.user_id, currency).await?;
        let Some(id) = created else {
            return Err(ApiError::conflict(
                "ACCOUNT_EXISTS",
                format!(
                    "you already have a {currency} account; there is one per user and currency"
                ),
            ));
        };
        let account = visible_account(&mut tx, caller, id).await?;
        Ok((StatusCode::CREATED, json!(account)))
    }
    .await;
    finish(&state, &request, tx, done).await
}

/// The account if the caller may see it: its owner, or an admin.
async fn visible_account(
    conn: &mut PgConnection,
    caller: Caller,
    id: i64,
) -> Result<AccountView, ApiError> {
    let account: Option<AccountView> = sqlx::query_as(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1 AND kind = 'USER' AND (user_id = $2 OR $3)"
    ))
    .bind(id)
    .bind(caller.user_id)
    .bind(caller.admin)
    .fetch_optional(conn)
    .await?;
    account
        .ok_or_else(|| ApiError::not_found("ACCOUNT_NOT_FOUND", format!("account {id} not found")))
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = path_id(&id, "ACCOUNT_NOT_FOUND")?;
    let mut conn = state.pool.acquire().await?;
    Ok(Json(visible_account(&mut conn, caller, id).await?).into_response())
}

pub async fn entries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = path_id(&id, "ACCOUNT_NOT_FOUND")?;
    only_query_params(&query, &["limit", "cursor"])?;
    let page = Page::parse(&query, state.settings.api.page_max)?;
    let mut conn = state.pool.acquire().await?;
    visible_account(&mut conn, caller, id).await?;
    let entries: Vec<EntryView> = sqlx::query_as(
        r#"
        SELECT e.id, e.transfer_id, t.kind, t.order_id, e.delta_fen, e.balance_after_fen, t.reference, e.created_at
        FROM ledger_entries e JOIN transfers t ON t.id = e.transfer_id
        WHERE e.account_id = $1 AND ($2::bigint IS NULL OR e.id < $2)
        ORDER BY e.id DESC
        LIMIT $3
        "#,
    )
    .bind(id)
    .bind(page.before)
    .bind(page.limit + 1)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Json(page.body(entries, |e| e.id)).into_response())
}

pub async fn deposit(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let id = path_id(&id, "ACCOUNT_NOT_FOUND")?;
    let request = IdempotentRequest::new(
        &headers,
        caller.user_id,
        "POST",
        &format!("/v1/accounts/{id}/deposits"),
        &body,
    )?;
    let fields = Fields::new(&body, &["amountFen", "reference"])?;
    let amount = fields.amount("amountFen", state.settings.api.max_deposit_amount_fen)?;
    let reference = match fields.get("reference") {
        Some(_) => fields.string("reference", 128)?.to_owned(),
        None => format!("deposit:{}", request.key),
    };
    let mut tx = match begin(&state, &request).await? {
        Begun::Replay(response) => return Ok(response),
        Begun::Fresh(tx) => tx,
    };
    let done = async {
        let deposited = match store::deposit(
            &mut tx,
            id,
            amount,
            &reference,
            &state.settings.topics.account_events,
        )
        .await?
        {
            Ok(deposited) => deposited,
            Err(PostError::UnknownAccount) => {
                return Err(ApiError::not_found(
                    "ACCOUNT_NOT_FOUND",
                    format!("account {id} not found"),
                ))
            }
            Err(PostError::Overflow) => {
                return Err(ApiError::invalid(
                    "BALANCE_OVERFLOW",
                    "the deposit would overflow the account balance",
                ))
            }
            Err(PostError::InsufficientBalance) => return Err(ApiError::internal()),
        };
        Ok((
            StatusCode::CREATED,
            json!({
                "accountId": deposited.account_id,
                "userId": deposited.user_id,
                "amountFen": amount.fen(),
                "balanceAfterFen": deposited.balance_after_fen,
                "reference": reference,
            }),
        ))
    }
    .await;
    finish(&state, &request, tx, done).await
}
