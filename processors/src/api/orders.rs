//! `/v1/orders`: place, read, list and cancel orders.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::auth::Caller;
use super::body::{string_value, Fields, JsonBody};
use super::error::ApiError;
use super::idempotency::IdempotentRequest;
use super::{begin, finish, only_query_params, path_id, AppState, Begun, Page};
use crate::domain::Currency;
use crate::events::OrderItem;
use crate::orders::store::{self, CancelOutcome, CancelRefused, NewOrder};
use crate::orders::OrderStatus;
use crate::settings::ApiSettings;

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let request = IdempotentRequest::new(&headers, caller.user_id, "POST", "/v1/orders", &body)?;
    let new = parse_order(&state.settings.api, caller.user_id, &body, &request.key)?;
    let mut tx = match begin(&state, &request).await? {
        Begun::Replay(response) => return Ok(response),
        Begun::Fresh(tx) => tx,
    };
    let done = store::create(&mut tx, &new, &state.settings.topics.order_events)
        .await
        .map(|order| (StatusCode::CREATED, json!(order)))
        .map_err(ApiError::from);
    finish(&state, &request, tx, done).await
}

/// `{amountFen, currency?, items: [{sku, qty, priceFen}]}`, where the items add up to the amount.
fn parse_order(
    limits: &ApiSettings,
    user_id: i64,
    body: &Map<String, Value>,
    key: &str,
) -> Result<NewOrder, ApiError> {
    let fields = Fields::new(body, &["amountFen", "currency", "items"])?;
    let amount = fields.amount("amountFen", limits.max_order_amount_fen)?;
    let currency = fields.currency("currency", &limits.currencies, Some(Currency::CNY))?;
    let items = fields
        .required("items")?
        .as_array()
        .filter(|items| !items.is_empty())
        .ok_or_else(|| ApiError::invalid("INVALID_FIELD", "items must be a non-empty array"))?;
    if items.len() > limits.max_items {
        return Err(ApiError::invalid(
            "TOO_MANY_ITEMS",
            format!("an order has at most {} items", limits.max_items),
        ));
    }
    let mut total: i64 = 0;
    let mut parsed = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let object = item.as_object().ok_or_else(|| {
            ApiError::invalid("INVALID_FIELD", format!("items[{i}] must be an object"))
        })?;
        let item = Fields::new(object, &["sku", "qty", "priceFen"])?;
        let sku = string_value(&format!("items[{i}].sku"), item.required("sku")?, 64)?;
        let qty = item
            .required("qty")?
            .as_i64()
            .filter(|q| (1..=1_000_000).contains(q))
            .ok_or_else(|| {
                ApiError::invalid(
                    "INVALID_FIELD",
                    format!("items[{i}].qty must be an integer from 1 to 1000000"),
                )
            })?;
        let price = item.amount("priceFen", limits.max_order_amount_fen)?;
        total = qty
            .checked_mul(price.fen())
            .and_then(|line| total.checked_add(line))
            .ok_or_else(|| {
                ApiError::invalid(
                    "ITEMS_TOTAL_MISMATCH",
                    "the items add up to more than any amount allowed",
                )
            })?;
        parsed.push(OrderItem {
            sku: sku.to_owned(),
            qty,
            price_fen: price,
        });
    }
    if total != amount.fen() {
        return Err(ApiError::invalid(
            "ITEMS_TOTAL_MISMATCH",
            format!(
                "the items add up to {total}, but amountFen is {}",
                amount.fen()
            ),
        ));
    }
    Ok(NewOrder {
        user_id,
        amount,
        currency,
        items: parsed,
        idempotency_key: key.to_owned(),
    })
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = path_id(&id, "ORDER_NOT_FOUND")?;
    let mut conn = state.pool.acquire().await?;
    match store::get(&mut conn, caller.user_id, id).await? {
        Some(order) => Ok(Json(order).into_response()),
        None => Err(ApiError::not_found(
            "ORDER_NOT_FOUND",
            format!("order {id} not found"),
        )),
    }
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    only_query_params(&query, &["status", "limit", "cursor"])?;
    let page = Page::parse(&query, state.settings.api.page_max)?;
    let status = match query.get("status") {
        None => None,
        Some(s) => Some(OrderStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(
                "INVALID_QUERY",
                "status must be one of PENDING, PAID, CANCELLED, REFUNDED",
            )
        })?),
    };
    let mut conn = state.pool.acquire().await?;
    let orders = store::list(
        &mut conn,
        caller.user_id,
        status,
        page.before,
        page.limit + 1,
    )
    .await?;
    Ok(Json(page.body(orders, |o| o.id)).into_response())
}

pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let id = path_id(&id, "ORDER_NOT_FOUND")?;
    Fields::new(&body, &[])?;
    let request = IdempotentRequest::new(
        &headers,
        caller.user_id,
        "POST",
        &format!("/v1/orders/{id}/cancel"),
        &body,
    )?;
    let mut tx = match begin(&state, &request).await? {
        Begun::Replay(response) => return Ok(response),
        Begun::Fresh(tx) => tx,
    };
    let done = async {
        let (status, order) = match store::cancel(
            &mut tx,
            caller.user_id,
            id,
            &state.settings.topics.order_events,
        )
        .await?
        {
            Ok(CancelOutcome::Cancelled(order)) => (StatusCode::OK, order),
            Ok(CancelOutcome::RefundRequested(order)) => (StatusCode::ACCEPTED, order),
            Err(CancelRefused::NotFound) => {
                return Err(ApiError::not_found(
                    "ORDER_NOT_FOUND",
                    format!("order {id} not found"),
                ))
            }
            Err(CancelRefused::AlreadyFinal(status)) => {
                return Err(ApiError::conflict(
                    "ORDER_NOT_CANCELLABLE",
                    format!("order {id} is {} and cannot be cancelled", status.as_str()),
                ))
            }
            Err(CancelRefused::RefundAlreadyRequested) => {
                return Err(ApiError::conflict(
                    "REFUND_ALREADY_REQUESTED",
                    format!("order {id} was already cancelled; its refund is on its way"),
                ))
            }
        };
        Ok((status, json!(order)))
    }
    .await;
    finish(&state, &request, tx, done).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Amount;
    use crate::settings::Settings;

    fn parse(body: Value) -> Result<NewOrder, &'static str> {
        let settings = Settings::load(None).expect("defaults");
        let Value::Object(map) = body else {
            return Err("not an object");
        };
        parse_order(&settings.api, 1, &map, "k").map_err(|e| e.code)
    }

    #[test]
    fn an_order_must_add_up_and_stay_within_limits() {
        let ok =
            parse(json!({"amountFen": 300, "items": [{"sku": "A", "qty": 3, "priceFen": 100}]}));
        assert_eq!(
            ok.map(|o| (o.amount, o.currency)),
            Ok((Amount::new(300).expect("positive"), Currency::CNY))
        );
        let cases = [
            (
                json!({"amountFen": 200, "items": [{"sku": "A", "qty": 3, "priceFen": 100}]}),
                "ITEMS_TOTAL_MISMATCH",
            ),
            (
                json!({"amountFen": 0, "items": [{"sku": "A", "qty": 1, "priceFen": 1}]}),
                "INVALID_AMOUNT",
            ),
            (
                json!({"amountFen": 1.5, "items": [{"sku": "A", "qty": 1, "priceFen": 1}]}),
                "INVALID_AMOUNT",
            ),
            (
                json!({"amountFen": 1, "currency": "XYZ", "items": [{"sku": "A", "qty": 1, "priceFen": 1}]}),
                "UNSUPPORTED_CURRENCY",
            ),
            (
                json!({"amountFen": 1, "status": "PAID", "items": [{"sku": "A", "qty": 1, "priceFen": 1}]}),
                "UNKNOWN_FIELD",
            ),
            (json!({"amountFen": 1, "items": []}), "INVALID_FIELD"),
            (json!({"amountFen": 1}), "MISSING_FIELD"),
            (
                json!({"amountFen": 1, "items": [{"sku": "A", "qty": 9223372036854775807i64, "priceFen": 2}]}),
                "INVALID_FIELD",
            ),
            (
                json!({"amountFen": 1_000_000_000_000i64, "items": [{"sku": "A", "qty": 1, "priceFen": 1}]}),
                "AMOUNT_LIMIT_EXCEEDED",
            ),
        ];
        for (body, code) in cases {
            assert_eq!(parse(body.clone()).err(), Some(code), "{body}");
        }
    }

    /// A property test: a valid body and thousands of hostile mutations of it. Whatever
    /// `parse_order` accepts satisfies the OpenAPI schema of `NewOrder` (docs/openapi.json)
    /// and adds up; nothing panics. (The API is stricter than that schema in places, e.g.
    /// currencies come from `api.currencies`, so only this direction holds.)
    #[test]
    fn every_order_body_the_api_accepts_satisfies_its_schema_and_adds_up() {
        use crate::testing::{env_u64, mutate, Rng};
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let spec: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("openapi.json"))
                .expect("JSON");
        let schema =
            json!({"$ref": "#/components/schemas/NewOrder", "components": spec["components"]});
        let validator = jsonschema::validator_for(&schema).expect("schema compiles");
        let settings = Settings::load(None).expect("defaults");
        let valid = json!({"amountFen": 300, "currency": "CNY",
                           "items": [{"sku": "A", "qty": 3, "priceFen": 100}]});
        assert!(validator.is_valid(&valid));
        let seed = env_u64("PAYSTREAM_FUZZ_SEED", 0x5eed);
        let mut rng = Rng(seed);
        let mut accepted = 0;
        for case in 0..env_u64("PAYSTREAM_FUZZ_CASES", 2_000) {
            let mut body = valid.clone();
            for _ in 0..=rng.below(3) {
                mutate(&mut body, &mut rng);
            }
            let Value::Object(map) = &body else {
                continue;
            };
            let Ok(order) = parse_order(&settings.api, 1, map, "k") else {
                continue;
            };
            accepted += 1;
            let why = format!("case {case} (seed {seed}): {body}");
            assert!(
                validator.is_valid(&body),
                "accepted but fails its schema: {why}"
            );
            let total: i64 = order.items.iter().map(|i| i.qty * i.price_fen.fen()).sum();
            assert_eq!(total, order.amount.fen(), "{why}");
            assert!(
                order.amount.fen() <= settings.api.max_order_amount_fen,
                "{why}"
            );
        }
        assert!(
            accepted > 0,
            "no mutation was accepted: the campaign tested nothing"
        );
    }
}
