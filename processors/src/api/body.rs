//! Request bodies: read within the size limit, parsed as JSON, then checked field by field so
//! every rejection says which field and why, with a stable code. Unknown fields are refused:
//! a client that sends `status` or `balanceFen` is told so, not silently ignored.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::domain::{Amount, Currency};

/// A JSON object body. An empty body reads as `{}` (for calls like cancel that need none).
#[derive(Debug)]
pub struct JsonBody(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "PAYLOAD_TOO_LARGE",
                    "the request body is too large",
                )
            } else {
                ApiError::bad_request("MALFORMED_BODY", "the request body could not be read")
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(Map::new()));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ApiError::invalid(
                "INVALID_REQUEST",
                "the request body must be a JSON object",
            )),
            Err(e) => Err(ApiError::bad_request(
                "MALFORMED_JSON",
                format!("the request body is not valid JSON: {e}"),
            )),
        }
    }
}

/// Fields a client may never set: paystream owns them.
const SERVER_OWNED: &[&str] = &[
    "id",
    "status",
    "balance",
    "balanceFen",
    "userId",
    "accountId",
    "orderId",
    "orderNo",
    "createdAt",
    "updatedAt",
    "paidAt",
    "cancelledAt",
    "refundedAt",
    "cancelReason",
];

/// Field access over a request object, with the API's error codes.
pub struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    /// Checks that only `allowed` fields are present.
    pub fn new(map: &'a Map<String, Value>, allowed: &[&str]) -> Result<Self, ApiError> {
        if let Some(name) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            let message = if SERVER_OWNED.contains(&name.as_str()) {
                format!("field {name:?} is set by paystream and cannot be supplied by clients")
            } else {
                format!(
                    "unknown field {name:?}; allowed fields: {}",
                    allowed.join(", ")
                )
            };
            return Err(ApiError::invalid("UNKNOWN_FIELD", message));
        }
        Ok(Self(map))
    }

    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn required(&self, name: &str) -> Result<&'a Value, ApiError> {
        self.get(name).ok_or_else(|| {
            ApiError::invalid("MISSING_FIELD", format!("field {name:?} is required"))
        })
    }

    /// An amount in minor units: a JSON integer in `1..=max`.
    pub fn amount(&self, name: &str, max: i64) -> Result<Amount, ApiError> {
        let value = self.required(name)?;
        let amount = Amount::from_json(value).ok_or_else(|| {
            ApiError::invalid(
                "INVALID_AMOUNT",
                format!(
                    "{name} must be a positive integer number of minor units (fen), got {value}"
                ),
            )
        })?;
        if amount.fen() > max {
            return Err(ApiError::invalid(
                "AMOUNT_LIMIT_EXCEEDED",
                format!("{name} must not exceed {max}"),
            ));
        }
        Ok(amount)
    }

    /// A currency from the configured list; `default` when the field is absent.
    pub fn currency(
        &self,
        name: &str,
        accepted: &[String],
        default: Option<Currency>,
    ) -> Result<Currency, ApiError> {
        let value = match (self.get(name), default) {
            (None, Some(default)) => return Ok(default),
            (None, None) => {
                return Err(ApiError::invalid(
                    "MISSING_FIELD",
                    format!("field {name:?} is required"),
                ))
            }
            (Some(value), _) => value,
        };
        value
            .as_str()
            .filter(|code| accepted.iter().any(|a| a == code))
            .and_then(Currency::parse)
            .ok_or_else(|| {
                ApiError::invalid(
                    "UNSUPPORTED_CURRENCY",
                    format!("{name} must be one of {}, got {value}", accepted.join(", ")),
                )
            })
    }

    /// A string of 1 to `max_chars` characters.
    pub fn string(&self, name: &str, max_chars: usize) -> Result<&'a str, ApiError> {
        string_value(name, self.required(name)?, max_chars)
    }
}

pub fn string_value<'v>(
    name: &str,
    value: &'v Value,
    max_chars: usize,
) -> Result<&'v str, ApiError> {
    value
        .as_str()
        .filter(|s| !s.trim().is_empty() && s.chars().count() <= max_chars)
        .ok_or_else(|| {
            ApiError::invalid(
                "INVALID_FIELD",
                format!("{name} must be a string of 1 to {max_chars} characters"),
            )
        })
}
