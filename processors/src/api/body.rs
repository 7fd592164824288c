//! Request bodies: read within the size limit, parsed as JSON, then checked field by field so
//! every rejection says which field and why, with a stable code. Unknown fields are refused:
//! a client that sends `status` or `balanceFen` is told so, not silently ignored.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
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
        match serde_json::from_slice::<UniqueKeys>(&bytes) {
            Ok(UniqueKeys(Value::Object(map))) => Ok(Self(map)),
            Ok(_) => Err(ApiError::invalid(
                "INVALID_REQUEST",
                "the request body must be a JSON object",
            )),
            Err(e) if e.to_string().starts_with(DUPLICATE) => Err(ApiError::bad_request(
                "DUPLICATE_JSON_KEY",
                format!("the request body is ambiguous: {e}; send each key once"),
            )),
            Err(e) => Err(ApiError::bad_request(
                "MALFORMED_JSON",
                format!("the request body is not valid JSON: {e}"),
            )),
        }
    }
}

const DUPLICATE: &str = "duplicate key";

/// A JSON value whose objects, at any depth, name each key once. serde_json keeps the last of
/// two equal keys; a proxy, a WAF or an audit log reading the same bytes may keep the first
/// (a parser differential), so a body that says two things is refused, not interpreted.
struct UniqueKeys(Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(UniqueKeysVisitor)
            .map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("{DUPLICATE} {key:?}")));
            }
            let UniqueKeys(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
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

    /// A currency from the configured list; `default` when the field is absent (not when it
    /// is `null`: the schema says a string, and a body that says "no currency" is refused
    /// rather than read as the default).
    pub fn currency(
        &self,
        name: &str,
        accepted: &[String],
        default: Option<Currency>,
    ) -> Result<Currency, ApiError> {
        let value = match (self.0.get(name), default) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: &str) -> Result<Value, String> {
        serde_json::from_str::<UniqueKeys>(body)
            .map(|v| v.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_body_naming_a_key_twice_at_any_depth_is_refused_and_the_rest_reads_as_serde_json_does() {
        for body in [
            r#"{"amountFen": 1, "amountFen": 2}"#,
            r#"{"items": [{"sku": "a", "sku": "b"}]}"#,
            r#"{"a": {"b": {"c": 1, "c": 1}}}"#,
        ] {
            let error = read(body).expect_err(body);
            assert!(error.starts_with(DUPLICATE), "{body}: {error}");
        }
        for body in [
            r#"{"amountFen": 100, "currency": "CNY", "items": [{"sku": "a", "qty": 1, "priceFen": 100}]}"#,
            r#"[1, -2, 3.5, 18446744073709551615, "x", null, true, {"a": [], "b": {}}]"#,
            r#"{"a": 1, "b": {"a": 1}}"#,
        ] {
            let ours = read(body).expect(body);
            let theirs: Value = serde_json::from_str(body).expect(body);
            assert_eq!(ours, theirs, "{body}");
        }
    }

    /// Hostile bytes: deep nesting, huge numbers, random bytes. A refusal, never a panic or a
    /// stack overflow (serde_json's recursion limit holds through this visitor too).
    #[test]
    fn hostile_bodies_are_refused_without_a_panic() {
        use crate::testing::{env_u64, Rng};
        for deep in ["[".repeat(100_000), "{\"a\":".repeat(100_000)] {
            assert!(read(&deep).is_err());
        }
        // Refused, or read as a number no amount field takes.
        let huge = read(&format!("{{\"amountFen\": 1{}}}", "0".repeat(100_000)));
        assert!(huge.map_or(true, |v| v["amountFen"].as_i64().is_none()));
        let mut rng = Rng(env_u64("PAYSTREAM_FUZZ_SEED", 0x5eed));
        let alphabet = b"{}[]\",:0123456789.-eE truefalsnul\\u";
        for _ in 0..env_u64("PAYSTREAM_FUZZ_CASES", 2_000) {
            let len = rng.below(48);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let _ = serde_json::from_slice::<UniqueKeys>(&bytes);
        }
    }
}
