//! The whole system in this process — API on a real socket, both processors, the relay and
//! the timeout sweeper — and a small HTTP client for it.

use std::time::Duration;

use paystream_processors::api::auth;
use paystream_processors::settings::Settings;
use paystream_processors::startup::{self, Part};
use reqwest::StatusCode;
use serde_json::Value;

use super::{wait_until, TestEnv, DEADLINE};

/// Which parts to run; the saga tests stop some of them to force an ordering.
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    pub account_processor: bool,
    pub order_processor: bool,
    pub relay: bool,
    pub sweeper: bool,
}

impl Parts {
    pub const ALL: Parts = Parts {
        account_processor: true,
        order_processor: true,
        relay: true,
        sweeper: true,
    };
}

pub struct System {
    pub api: Client,
    running: startup::Running,
}

impl System {
    /// The API on a socket of its own and the chosen parts, wired as `paystream up` wires
    /// them (`startup::start`).
    pub async fn start(env: &TestEnv, settings: &Settings, parts: Parts) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let chosen = [
            (true, Part::Api),
            (parts.account_processor, Part::AccountProcessor),
            (parts.order_processor, Part::OrderProcessor),
            (parts.relay, Part::Relay),
            (parts.sweeper, Part::Sweeper),
        ];
        let parts: Vec<Part> = chosen
            .into_iter()
            .filter_map(|(on, part)| on.then_some(part))
            .collect();
        let running =
            startup::start(&parts, settings, &env.pool, Some(listener)).expect("start the parts");
        Self {
            api: Client::new(base, &settings.api.jwt_secret),
            running,
        }
    }

    pub async fn stop(self) {
        self.running
            .stop(DEADLINE)
            .await
            .expect("every part ends cleanly");
    }
}

/// A reply: status, body, and whether it was an idempotent replay.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    pub replayed: bool,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    pub fn id(&self) -> i64 {
        self.body["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("no id in {self:?}"))
    }

    #[track_caller]
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(self.status.as_u16(), status, "unexpected reply {self:?}");
        self
    }
}

#[derive(Clone)]
pub struct Client {
    pub base: String,
    secret: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: String, secret: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        Self {
            base,
            secret: secret.to_owned(),
            http,
        }
    }

    pub fn token(&self, user: i64) -> String {
        auth::mint(&self.secret, user, false, Duration::from_secs(3600)).expect("mint")
    }

    pub fn admin_token(&self) -> String {
        auth::mint(&self.secret, 1, true, Duration::from_secs(3600)).expect("mint")
    }

    /// Sends a raw request; `token` and `key` are optional headers.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<String>,
    ) -> Reply {
        Self::reply(self.request(method, path, token, key, body))
            .await
            .expect("request")
    }

    /// A request with the optional bearer token, idempotency key and JSON body.
    fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<String>,
    ) -> reqwest::RequestBuilder {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        req
    }

    /// Like `post`, with a transport error (API down, connection reset) returned, not a panic.
    pub async fn try_post(
        &self,
        path: &str,
        token: &str,
        key: &str,
        body: &Value,
    ) -> Result<Reply, reqwest::Error> {
        Self::reply(self.request("POST", path, Some(token), Some(key), Some(body.to_string())))
            .await
    }

    async fn reply(req: reqwest::RequestBuilder) -> Result<Reply, reqwest::Error> {
        let resp = req.send().await?;
        let status = resp.status();
        let replayed = resp.headers().get("idempotent-replayed").is_some();
        let bytes = resp.bytes().await?;
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Ok(Reply {
            status,
            body,
            replayed,
        })
    }

    pub async fn post(&self, path: &str, token: &str, key: &str, body: &Value) -> Reply {
        self.send("POST", path, Some(token), Some(key), Some(body.to_string()))
            .await
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.send("GET", path, Some(token), None, None).await
    }

    /// Opens a CNY account for `user` and, if `balance > 0`, deposits it (as admin).
    pub async fn funded_account(&self, user: i64, balance: i64) -> i64 {
        let token = self.token(user);
        let account = self
            .post(
                "/v1/accounts",
                &token,
                &format!("open-{user}"),
                &serde_json::json!({"currency": "CNY"}),
            )
            .await
            .expect(201)
            .id();
        if balance > 0 {
            self.post(
                &format!("/v1/accounts/{account}/deposits"),
                &self.admin_token(),
                &format!("deposit-{account}"),
                &serde_json::json!({"amountFen": balance}),
            )
            .await
            .expect(201);
        }
        account
    }

    pub async fn place_order(&self, user: i64, key: &str, amount: i64) -> Reply {
        self.post("/v1/orders", &self.token(user), key, &order_body(amount))
            .await
    }

    pub async fn order(&self, user: i64, id: i64) -> Value {
        self.get(&format!("/v1/orders/{id}"), &self.token(user))
            .await
            .expect(200)
            .body
    }

    /// Waits until order `id` has `status` (and, if asked, a refund recorded), returns it.
    pub async fn wait_order(&self, user: i64, id: i64, status: &str) -> Value {
        wait_until(&format!("order {id} to be {status}"), || async {
            let order = self.order(user, id).await;
            (order["status"] == status).then_some(order)
        })
        .await
    }

    pub async fn balance(&self, user: i64, account: i64) -> i64 {
        self.get(&format!("/v1/accounts/{account}"), &self.token(user))
            .await
            .expect(200)
            .body["balanceFen"]
            .as_i64()
            .expect("balanceFen")
    }
}

pub fn order_body(amount: i64) -> Value {
    serde_json::json!({"amountFen": amount, "currency": "CNY", "items": [{"sku": "SKU-1", "qty": 1, "priceFen": amount}]})
}
