//! Bearer tokens (JWT, HS256) and the per-user rate limit.
//!
//! A token's `sub` is the user id; `admin: true` allows operator calls (deposits). Every
//! handler that takes a [`Caller`] is authenticated and rate limited before it runs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::AppState;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    admin: bool,
    iat: u64,
    exp: u64,
}

/// Signs a token for `user_id`, valid for `ttl`.
pub fn mint(
    secret: &str,
    user_id: i64,
    admin: bool,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: user_id.to_string(),
        admin,
        iat: now,
        exp: now + ttl.as_secs(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Who is calling, from a verified token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub user_id: i64,
    pub admin: bool,
}

impl Caller {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                "this operation needs an admin token",
            ))
        }
    }
}

pub fn verify(secret: &str, token: &str) -> Result<Caller, ApiError> {
    let invalid = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_TOKEN",
            "the bearer token is invalid or expired",
        )
    };
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(|_| invalid())?;
    let user_id = data
        .claims
        .sub
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(invalid)?;
    Ok(Caller {
        user_id,
        admin: data.claims.admin,
    })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "an Authorization: Bearer token is required",
            )
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHENTICATED",
                    "expected Authorization: Bearer <token>",
                )
            })?;
        let caller = verify(&state.settings.api.jwt_secret, token.trim())?;
        if !state.rate_limiter.allow(caller.user_id) {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMITED",
                "too many requests for this user; slow down and retry",
            ));
        }
        Ok(caller)
    }
}

/// A token bucket per user: `rate` tokens per second, at most `burst` stored.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<i64, (f64, Instant)>>,
}

/// Above this many tracked users, full (idle) buckets are forgotten.
const MAX_TRACKED_USERS: usize = 100_000;

impl RateLimiter {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn allow(&self, user_id: i64) -> bool {
        self.allow_at(user_id, Instant::now())
    }

    fn allow_at(&self, user_id: i64, now: Instant) -> bool {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if buckets.len() > MAX_TRACKED_USERS {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(user_id).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate)
            .min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_verifies_and_carries_the_user() {
        let secret = "0123456789abcdef0123";
        let token = mint(secret, 42, true, Duration::from_secs(60)).expect("mint");
        assert_eq!(
            verify(secret, &token),
            Ok(Caller {
                user_id: 42,
                admin: true
            })
        );
        assert_eq!(
            verify("another-secret-entirely", &token).map_err(|e| e.code),
            Err("INVALID_TOKEN")
        );
        assert_eq!(
            verify(secret, "not.a.token").map_err(|e| e.code),
            Err("INVALID_TOKEN")
        );
    }

    #[test]
    fn the_rate_limiter_allows_a_burst_then_the_rate() {
        let limiter = RateLimiter::new(10.0, 3.0);
        let start = Instant::now();
        assert!((0..3).all(|_| limiter.allow_at(1, start)));
        assert!(!limiter.allow_at(1, start));
        assert!(limiter.allow_at(2, start), "users have separate buckets");
        assert!(limiter.allow_at(1, start + Duration::from_millis(100)));
        assert!(!limiter.allow_at(1, start + Duration::from_millis(100)));
    }
}
