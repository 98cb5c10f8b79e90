//! Request handling of the simulated Stripe API (pure functions over [`State`]).

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use super::state::{Account, EndpointRecord, EndpointSecret, KeyRecord, State, random_alnum};
use crate::egress::routes::{Route, grants};
use crate::stripe::config::Mode;
use crate::stripe::jwe::{KeyWrapAlgorithm, encrypt_compact, parse_public_key_pem};

/// Most webhook endpoints Stripe allows per account.
pub(crate) const MAX_WEBHOOK_ENDPOINTS: usize = 16;
const MAX_ROTATION_MINUTES: i64 = 10_080;

/// An answer: status, JSON body, extra headers.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub(crate) fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body,
            headers: Vec::new(),
        }
    }
}

/// Builds Stripe's error envelope.
pub(crate) fn error_reply(
    status: u16,
    error_type: &str,
    code: Option<&str>,
    message: impl Into<String>,
    param: Option<&str>,
    request_id: &str,
    mode: Option<Mode>,
) -> Reply {
    let mut err = Map::new();
    err.insert("type".into(), json!(error_type));
    if let Some(code) = code {
        err.insert("code".into(), json!(code));
        err.insert(
            "doc_url".into(),
            json!(format!(
                "https://stripe.com/docs/error-codes/{}",
                code.replace('_', "-")
            )),
        );
    }
    err.insert("message".into(), json!(message.into()));
    if let Some(param) = param {
        err.insert("param".into(), json!(param));
    }
    let dash = match mode {
        Some(Mode::Live) => "",
        _ => "test/",
    };
    err.insert(
        "request_log_url".into(),
        json!(format!(
            "https://dashboard.stripe.com/{dash}logs/{request_id}"
        )),
    );
    Reply {
        status,
        body: json!({ "error": Value::Object(err) }),
        headers: Vec::new(),
    }
}

/// Settings that choose between answers Stripe's documentation leaves open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Behaviour {
    /// Test mode requires `public_key` for secret keys like live mode does.
    pub strict_public_key: bool,
    /// Expiring an already expired key is a 400 `resource_already_expired` instead of a 200
    /// showing the key as it is.
    pub reexpire_error: bool,
}

/// Per-request context.
pub(crate) struct Ctx<'a> {
    pub request_id: &'a str,
    pub app_id: &'a str,
    pub now: DateTime<Utc>,
    pub behaviour: Behaviour,
    /// How long after a use it shows in `last_used`.
    pub last_used_lag: chrono::Duration,
    /// The id of the API key that made the call (the app key's id), for the activity log.
    pub caller_key_id: &'a str,
}

/// A parsed API request.
pub(crate) struct ApiRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub body: &'a [u8],
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub(crate) fn redacted(token: &str) -> String {
    let prefix_len = token
        .find('_')
        .and_then(|i| token[i + 1..].find('_').map(|j| i + j + 2));
    let prefix = prefix_len.map(|n| &token[..n]).unwrap_or("");
    let tail = &token[token.len().saturating_sub(4)..];
    format!("{prefix}...{tail}")
}

pub(crate) enum SecretView {
    /// What retrieve and list show.
    Stored,
    /// Create/rotate in live mode: the secret encrypted to the caller's key.
    Encrypted {
        jwe: String,
        recipient_key_id: Option<String>,
    },
}

pub(crate) fn render_key(
    k: &KeyRecord,
    mode: Mode,
    now: DateTime<Utc>,
    lag: chrono::Duration,
    app_id: &str,
    view: SecretView,
) -> Value {
    let mut v = json!({
        "id": k.id,
        "object": "v2.iam.api_key",
        "type": k.key_type,
        "name": k.name,
        "note": k.note,
        "status": if k.is_expired(now) { "expired" } else { "active" },
        "created": rfc3339(k.created),
        "expires_at": k.expires_at.map(rfc3339),
        "last_used": k.reported_last_used(now, lag).map(rfc3339),
        "livemode": mode == Mode::Live,
        "ip_allowlist": [],
        "managed_by": if k.dashboard_created {
            Value::Null
        } else {
            json!({ "type": "application", "application": { "id": app_id } })
        },
        "permissions": k.permissions,
        "connect_permissions": k.connect_permissions,
    });
    if k.key_type == "publishable_key" {
        v["publishable_key"] = json!({ "token": k.token });
    } else {
        let mut sk = Map::new();
        sk.insert("secret_token_redacted".into(), json!(redacted(&k.token)));
        match (mode, view) {
            (Mode::Test, _) => {
                sk.insert("token".into(), json!(k.token));
            }
            (
                Mode::Live,
                SecretView::Encrypted {
                    jwe,
                    recipient_key_id,
                },
            ) => {
                let mut enc = json!({ "ciphertext": jwe, "format": "jwe_compact" });
                if let Some(kid) = recipient_key_id {
                    enc["recipient_key_id"] = json!(kid);
                }
                sk.insert("encrypted_secret".into(), enc);
            }
            (Mode::Live, SecretView::Stored) => {}
        }
        v["secret_key"] = Value::Object(sk);
    }
    v
}

pub(crate) fn render_endpoint(
    e: &EndpointRecord,
    mode: Mode,
    app_id: &str,
    secret: Option<&str>,
) -> Value {
    let mut v = json!({
        "id": e.id,
        "object": "webhook_endpoint",
        "url": e.url,
        "enabled_events": e.enabled_events,
        "api_version": e.api_version,
        "application": app_id,
        "created": e.created,
        "description": e.description,
        "livemode": mode == Mode::Live,
        "metadata": e.metadata,
        "status": if e.disabled { "disabled" } else { "enabled" },
    });
    if let Some(s) = secret {
        v["secret"] = json!(s);
    }
    v
}

struct Handler<'a, 'c> {
    acct: &'a mut Account,
    tokens: &'a mut std::collections::HashMap<String, (usize, String)>,
    acct_index: usize,
    ctx: &'a Ctx<'c>,
}

impl Handler<'_, '_> {
    fn err(
        &self,
        status: u16,
        t: &str,
        code: Option<&str>,
        msg: impl Into<String>,
        param: Option<&str>,
    ) -> Reply {
        error_reply(
            status,
            t,
            code,
            msg,
            param,
            self.ctx.request_id,
            Some(self.acct.mode),
        )
    }

    fn invalid(&self, code: &str, msg: impl Into<String>, param: &str) -> Reply {
        self.err(400, "invalid_request_error", Some(code), msg, Some(param))
    }

    fn missing_key(&self, id: &str) -> Reply {
        self.err(
            404,
            "invalid_request_error",
            Some("resource_missing"),
            format!("No such api key: '{id}'"),
            Some("id"),
        )
    }

    fn mode_tag(&self) -> &'static str {
        match self.acct.mode {
            Mode::Test => "test",
            Mode::Live => "live",
        }
    }

    fn new_token(&self, key_type: &str) -> String {
        let prefix = if key_type == "publishable_key" {
            "pk"
        } else {
            "rk"
        };
        format!("{prefix}_{}_{}", self.mode_tag(), random_alnum(99))
    }

    fn json_object(&self, body: &[u8]) -> Result<Map<String, Value>, Reply> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Map::new());
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(self.err(
                400,
                "invalid_request_error",
                Some("parameter_invalid"),
                "The request body must be a JSON object (v2 APIs take JSON, not form encoding).",
                None,
            )),
        }
    }

    fn only_params(&self, m: &Map<String, Value>, allowed: &[&str]) -> Result<(), Reply> {
        for k in m.keys() {
            if !allowed.contains(&k.as_str()) {
                return Err(self.invalid(
                    "parameter_unknown",
                    format!("Received unknown parameter: {k}"),
                    k,
                ));
            }
        }
        Ok(())
    }

    fn opt_string(&self, m: &Map<String, Value>, name: &str) -> Result<Option<String>, Reply> {
        match m.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.invalid(
                "parameter_invalid",
                format!("{name} must be a string"),
                name,
            )),
        }
    }

    fn permissions(
        &self,
        m: &Map<String, Value>,
        name: &str,
    ) -> Result<Option<Vec<String>>, Reply> {
        match m.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for item in items {
                    let Some(p) = item.as_str() else {
                        return Err(self.invalid(
                            "parameter_invalid",
                            format!("{name} must be a list of strings"),
                            name,
                        ));
                    };
                    if !valid_permission(p) {
                        return Err(self.invalid(
                            "parameter_invalid",
                            format!("Invalid permission {p:?}: permissions look like <resource>_read or <resource>_write"),
                            name,
                        ));
                    }
                    if !out.iter().any(|o| o == p) {
                        out.push(p.to_owned());
                    }
                }
                Ok(Some(out))
            }
            Some(_) => {
                Err(self.invalid("parameter_invalid", format!("{name} must be a list"), name))
            }
        }
    }

    /// Validates `public_key` and returns the parsed key and its optional id.
    fn public_key(
        &self,
        m: &Map<String, Value>,
        required: bool,
    ) -> Result<Option<(aws_lc_rs::rsa::PublicEncryptingKey, Option<String>)>, Reply> {
        let Some(pk) = m.get("public_key").filter(|v| !v.is_null()) else {
            if required {
                return Err(self.invalid(
                    "parameter_missing",
                    "Missing required param: public_key. Secret keys are returned encrypted to an RSA public key of at least 2048 bits.",
                    "public_key",
                ));
            }
            return Ok(None);
        };
        let id = pk.get("id").and_then(Value::as_str).map(str::to_owned);
        let algorithm = pk.pointer("/pem_key/algorithm").and_then(Value::as_str);
        if algorithm != Some("RSA") {
            return Err(self.invalid(
                "parameter_invalid",
                "public_key.pem_key.algorithm must be \"RSA\"",
                "public_key[pem_key][algorithm]",
            ));
        }
        let Some(data) = pk.pointer("/pem_key/data").and_then(Value::as_str) else {
            return Err(self.invalid(
                "parameter_missing",
                "Missing required param: public_key.pem_key.data",
                "public_key[pem_key][data]",
            ));
        };
        match parse_public_key_pem(data) {
            Ok(key) => Ok(Some((key, id))),
            Err(e) => Err(self.invalid(
                "parameter_invalid",
                format!("public_key.pem_key.data is not an acceptable RSA public key (PEM SubjectPublicKeyInfo, at least 2048 bits): {e}"),
                "public_key[pem_key][data]",
            )),
        }
    }

    fn secret_view(
        &self,
        token: &str,
        pk: Option<&(aws_lc_rs::rsa::PublicEncryptingKey, Option<String>)>,
    ) -> Result<SecretView, Reply> {
        match (self.acct.mode, pk) {
            (Mode::Live, Some((key, kid))) => {
                match encrypt_compact(
                    key,
                    KeyWrapAlgorithm::RsaOaep256,
                    token.as_bytes(),
                    kid.as_deref(),
                ) {
                    Ok(jwe) => Ok(SecretView::Encrypted {
                        jwe,
                        recipient_key_id: kid.clone(),
                    }),
                    Err(_) => Err(self.err(
                        500,
                        "api_error",
                        None,
                        "Could not encrypt the secret.",
                        None,
                    )),
                }
            }
            _ => Ok(SecretView::Stored),
        }
    }

    /// Secret keys need `public_key` in live mode; in test mode only when the strict setting
    /// is on (the notes leave test mode unconfirmed; the secret comes back in plaintext there).
    fn public_key_required(&self, key_type: &str) -> bool {
        key_type == "secret_key"
            && (self.acct.mode == Mode::Live || self.ctx.behaviour.strict_public_key)
    }

    fn find_key(&self, id: &str) -> Option<usize> {
        self.acct.keys.iter().position(|k| k.id == id)
    }

    fn render(&self, k: &KeyRecord, view: SecretView) -> Value {
        render_key(
            k,
            self.acct.mode,
            self.ctx.now,
            self.ctx.last_used_lag,
            self.ctx.app_id,
            view,
        )
    }

    /// Records an activity-log entry about `key`, made by the calling app key.
    fn log_key(&mut self, action: &str, key: &KeyRecord, new_key: Option<&KeyRecord>) {
        self.acct.activity.record_key(
            action,
            super::activity::SimActor::ApiKey {
                id: self.ctx.caller_key_id.to_owned(),
            },
            self.ctx.now,
            key,
            self.ctx.app_id,
            new_key,
        );
    }

    fn insert_key(&mut self, rec: KeyRecord) {
        self.tokens
            .insert(rec.token.clone(), (self.acct_index, rec.id.clone()));
        self.acct.keys.push(rec);
    }

    // ------------------------------------------------------------------ v2 api keys

    fn create_key(&mut self, body: &[u8]) -> Reply {
        let m = match self.json_object(body) {
            Ok(m) => m,
            Err(r) => return r,
        };
        if let Err(r) = self.only_params(
            &m,
            &[
                "type",
                "name",
                "note",
                "permissions",
                "connect_permissions",
                "expires_at",
                "public_key",
            ],
        ) {
            return r;
        }
        let key_type = match m.get("type").and_then(Value::as_str) {
            Some(t @ ("secret_key" | "publishable_key")) => t.to_owned(),
            Some(_) => {
                return self.invalid(
                    "parameter_invalid",
                    "type must be secret_key or publishable_key",
                    "type",
                );
            }
            None => {
                return self.invalid("parameter_missing", "Missing required param: type.", "type");
            }
        };
        let (name, note) = match (self.opt_string(&m, "name"), self.opt_string(&m, "note")) {
            (Ok(n), Ok(o)) => (n, o),
            (Err(r), _) | (_, Err(r)) => return r,
        };
        let permissions = match self.permissions(&m, "permissions") {
            Ok(p) => p.unwrap_or_default(),
            Err(r) => return r,
        };
        let connect_permissions = match self.permissions(&m, "connect_permissions") {
            Ok(p) => p.unwrap_or_default(),
            Err(r) => return r,
        };
        let expires_at = match self.opt_string(&m, "expires_at") {
            Err(r) => return r,
            Ok(None) => None,
            Ok(Some(s)) => match DateTime::parse_from_rfc3339(&s) {
                Ok(t) if t.with_timezone(&Utc) > self.ctx.now => Some(t.with_timezone(&Utc)),
                Ok(_) => {
                    return self.invalid(
                        "parameter_invalid",
                        "expires_at must be in the future",
                        "expires_at",
                    );
                }
                Err(_) => {
                    return self.invalid(
                        "parameter_invalid",
                        "expires_at must be an RFC 3339 timestamp",
                        "expires_at",
                    );
                }
            },
        };
        let pk = match self.public_key(&m, self.public_key_required(&key_type)) {
            Ok(pk) => pk,
            Err(r) => return r,
        };
        let token = self.new_token(&key_type);
        let view = match self.secret_view(&token, pk.as_ref()) {
            Ok(v) => v,
            Err(r) => return r,
        };
        let rec = KeyRecord {
            id: format!("apikey_{}", random_alnum(24)),
            key_type,
            name,
            note,
            permissions,
            connect_permissions,
            token,
            created: self.ctx.now,
            expires_at,
            last_used: None,
            unreported_uses: Vec::new(),
            rotated_to: None,
            dashboard_created: false,
        };
        let out = self.render(&rec, view);
        self.log_key("api_key_created", &rec, None);
        self.insert_key(rec);
        Reply::ok(out)
    }

    fn list_keys(&self, query: &str) -> Reply {
        let mut include_expired = false;
        let mut limit = 10usize;
        let mut after: Option<String> = None;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "include_expired" => match v.as_ref() {
                    "true" => include_expired = true,
                    "false" => include_expired = false,
                    _ => {
                        return self.invalid(
                            "parameter_invalid",
                            "include_expired must be true or false",
                            "include_expired",
                        );
                    }
                },
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=100).contains(&n) => limit = n,
                    _ => {
                        return self.invalid(
                            "parameter_invalid",
                            "limit must be an integer between 1 and 100",
                            "limit",
                        );
                    }
                },
                "page" => after = Some(v.into_owned()),
                other => {
                    return self.invalid(
                        "parameter_unknown",
                        format!("Received unknown parameter: {other}"),
                        other,
                    );
                }
            }
        }
        let now = self.ctx.now;
        // newest first; the cursor is the last id of the previous page (it may have expired
        // since, so it is looked up among all keys)
        let all: Vec<&KeyRecord> = self.acct.keys.iter().rev().collect();
        let start = match &after {
            None => 0,
            Some(token) => {
                match decode_page_token(token).and_then(|id| all.iter().position(|k| k.id == id)) {
                    Some(i) => i + 1,
                    None => return self.invalid("parameter_invalid", "Invalid page token", "page"),
                }
            }
        };
        let visible: Vec<&KeyRecord> = all[start..]
            .iter()
            .filter(|k| include_expired || !k.is_expired(now))
            .copied()
            .collect();
        let page: Vec<&KeyRecord> = visible.iter().take(limit).copied().collect();
        let more = page.len() < visible.len();
        let next = if more {
            page.last().map(|last| {
                format!(
                    "/v2/iam/api_keys?include_expired={include_expired}&limit={limit}&page={}",
                    encode_page_token(&last.id)
                )
            })
        } else {
            None
        };
        let data: Vec<Value> = page
            .iter()
            .map(|k| self.render(k, SecretView::Stored))
            .collect();
        Reply::ok(json!({ "data": data, "next_page_url": next, "previous_page_url": null }))
    }

    fn retrieve_key(&self, id: &str) -> Reply {
        match self.find_key(id) {
            Some(i) => Reply::ok(self.render(&self.acct.keys[i], SecretView::Stored)),
            None => self.missing_key(id),
        }
    }

    fn update_key(&mut self, id: &str, body: &[u8]) -> Reply {
        let Some(i) = self.find_key(id) else {
            return self.missing_key(id);
        };
        let m = match self.json_object(body) {
            Ok(m) => m,
            Err(r) => return r,
        };
        if let Err(r) =
            self.only_params(&m, &["name", "note", "permissions", "connect_permissions"])
        {
            return r;
        }
        let name = match self.opt_string(&m, "name") {
            Ok(v) => v,
            Err(r) => return r,
        };
        let note = match self.opt_string(&m, "note") {
            Ok(v) => v,
            Err(r) => return r,
        };
        let perms = match self.permissions(&m, "permissions") {
            Ok(v) => v,
            Err(r) => return r,
        };
        let cperms = match self.permissions(&m, "connect_permissions") {
            Ok(v) => v,
            Err(r) => return r,
        };
        let key = &mut self.acct.keys[i];
        if let Some(n) = name {
            key.name = Some(n);
        }
        if let Some(n) = note {
            key.note = Some(n);
        }
        // As observed in reality: an empty permission list answers 200 and changes nothing.
        if let Some(p) = perms.filter(|p| !p.is_empty()) {
            key.permissions = p;
        }
        if let Some(p) = cperms.filter(|p| !p.is_empty()) {
            key.connect_permissions = p;
        }
        let key = self.acct.keys[i].clone();
        self.log_key("api_key_updated", &key, None);
        Reply::ok(self.render(&key, SecretView::Stored))
    }

    fn expire_key(&mut self, id: &str, body: &[u8]) -> Reply {
        let Some(i) = self.find_key(id) else {
            return self.missing_key(id);
        };
        let m = match self.json_object(body) {
            Ok(m) => m,
            Err(r) => return r,
        };
        if let Err(r) = self.only_params(&m, &[]) {
            return r;
        }
        let now = self.ctx.now;
        let key = &mut self.acct.keys[i];
        if key.is_expired(now) {
            if self.ctx.behaviour.reexpire_error {
                return self.invalid(
                    "resource_already_expired",
                    format!("The API key '{id}' has already expired."),
                    "id",
                );
            }
        } else {
            key.expires_at = Some(now);
            let key = key.clone();
            self.log_key("api_key_deleted", &key, None);
        }
        let key = &self.acct.keys[i];
        Reply::ok(self.render(key, SecretView::Stored))
    }

    fn rotate_key(&mut self, id: &str, body: &[u8]) -> Reply {
        let Some(i) = self.find_key(id) else {
            return self.missing_key(id);
        };
        let m = match self.json_object(body) {
            Ok(m) => m,
            Err(r) => return r,
        };
        if let Err(r) = self.only_params(&m, &["expire_current_key_in_minutes", "public_key"]) {
            return r;
        }
        let now = self.ctx.now;
        if self.acct.keys[i].is_expired(now) {
            return self.invalid(
                "api_key_expired",
                "An expired API key cannot be rotated.",
                "id",
            );
        }
        let minutes = match m.get("expire_current_key_in_minutes") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(n) if (0..=MAX_ROTATION_MINUTES).contains(&n) => Some(n),
                _ => {
                    return self.invalid(
                        "parameter_invalid",
                        format!("expire_current_key_in_minutes must be an integer between 0 and {MAX_ROTATION_MINUTES}"),
                        "expire_current_key_in_minutes",
                    );
                }
            },
        };
        let required = self.public_key_required(&self.acct.keys[i].key_type);
        let pk = match self.public_key(&m, required) {
            Ok(pk) => pk,
            Err(r) => return r,
        };
        let old = self.acct.keys[i].clone();
        let token = self.new_token(&old.key_type);
        let view = match self.secret_view(&token, pk.as_ref()) {
            Ok(v) => v,
            Err(r) => return r,
        };
        let new = KeyRecord {
            id: format!("apikey_{}", random_alnum(24)),
            token,
            created: now,
            expires_at: None,
            last_used: None,
            unreported_uses: Vec::new(),
            rotated_to: None,
            dashboard_created: false,
            ..old
        };
        let old_expiry = now + chrono::Duration::minutes(minutes.unwrap_or(0));
        let old_key = &mut self.acct.keys[i];
        old_key.expires_at = Some(match old_key.expires_at {
            Some(e) if e < old_expiry => e,
            _ => old_expiry,
        });
        old_key.rotated_to = Some(new.id.clone());
        let old_key = old_key.clone();
        self.log_key("api_key_rotated", &old_key, Some(&new));
        let out = self.render(&new, view);
        self.insert_key(new);
        Reply::ok(out)
    }

    // ------------------------------------------------------------------ v1 webhook endpoints

    fn missing_endpoint(&self, id: &str) -> Reply {
        self.err(
            404,
            "invalid_request_error",
            Some("resource_missing"),
            format!("No such webhook endpoint: '{id}'"),
            Some("id"),
        )
    }

    fn create_endpoint(&mut self, body: &[u8]) -> Reply {
        let form = match Form::parse(body) {
            Ok(f) => f,
            Err(e) => return self.invalid("parameter_invalid", e, "body"),
        };
        if let Err(r) = form.only(
            self,
            &["url", "api_version", "connect", "description"],
            &["enabled_events"],
            &["metadata"],
        ) {
            return r;
        }
        let Some(url) = form.scalars.get("url") else {
            return self.invalid("parameter_missing", "Missing required param: url.", "url");
        };
        if let Err(r) = self.check_url(url) {
            return r;
        }
        let events = form
            .arrays
            .get("enabled_events")
            .cloned()
            .unwrap_or_default();
        if events.is_empty() {
            return self.invalid(
                "parameter_missing",
                "Missing required param: enabled_events.",
                "enabled_events",
            );
        }
        if let Err(r) = self.check_events(&events) {
            return r;
        }
        if self.acct.endpoints.len() >= MAX_WEBHOOK_ENDPOINTS {
            return self.err(
                400,
                "invalid_request_error",
                Some("webhook_endpoints_limit_reached"),
                format!("You have reached the maximum of {MAX_WEBHOOK_ENDPOINTS} webhook endpoints for this account."),
                None,
            );
        }
        let connect = match form.scalars.get("connect").map(String::as_str) {
            None => false,
            Some("true") => true,
            Some("false") => false,
            Some(_) => {
                return self.invalid(
                    "parameter_invalid",
                    "connect must be true or false",
                    "connect",
                );
            }
        };
        let _ = connect;
        let secret = format!("whsec_{}", random_alnum(32));
        let rec = EndpointRecord {
            id: format!("we_{}", random_alnum(24)),
            url: url.clone(),
            enabled_events: events,
            api_version: form.scalars.get("api_version").cloned(),
            description: form
                .scalars
                .get("description")
                .cloned()
                .filter(|d| !d.is_empty()),
            metadata: form
                .maps
                .get("metadata")
                .map(|m| {
                    m.iter()
                        .filter(|(_, v)| !v.is_empty())
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            disabled: false,
            created: self.ctx.now.timestamp(),
            secrets: vec![EndpointSecret {
                secret: secret.clone(),
                expires_at: None,
            }],
        };
        let out = render_endpoint(&rec, self.acct.mode, self.ctx.app_id, Some(&secret));
        self.acct.endpoints.push(rec);
        Reply::ok(out)
    }

    fn check_url(&self, url: &str) -> Result<(), Reply> {
        match url::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
            _ => Err(self.invalid(
                "url_invalid",
                "Invalid URL: must be an absolute http(s) URL.",
                "url",
            )),
        }
    }

    fn check_events(&self, events: &[String]) -> Result<(), Reply> {
        for e in events {
            let ok = e == "*"
                || (!e.is_empty()
                    && e.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_'
                    }));
            if !ok {
                return Err(self.invalid(
                    "parameter_invalid",
                    format!("Invalid event type {e:?}"),
                    "enabled_events",
                ));
            }
        }
        Ok(())
    }

    fn list_endpoints(&self, query: &str) -> Reply {
        let mut limit = 10usize;
        let mut starting_after = None;
        let mut ending_before = None;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=100).contains(&n) => limit = n,
                    _ => {
                        return self.invalid(
                            "parameter_invalid",
                            "limit must be an integer between 1 and 100",
                            "limit",
                        );
                    }
                },
                "starting_after" => starting_after = Some(v.into_owned()),
                "ending_before" => ending_before = Some(v.into_owned()),
                other => {
                    return self.invalid(
                        "parameter_unknown",
                        format!("Received unknown parameter: {other}"),
                        other,
                    );
                }
            }
        }
        let all: Vec<&EndpointRecord> = self.acct.endpoints.iter().rev().collect();
        let position = |id: &str| all.iter().position(|e| e.id == id);
        let (page, has_more): (Vec<&EndpointRecord>, bool) = match (starting_after, ending_before) {
            (Some(_), Some(_)) => {
                return self.invalid(
                    "parameter_invalid",
                    "Use either starting_after or ending_before, not both.",
                    "starting_after",
                );
            }
            (Some(after), None) => {
                let Some(i) = position(&after) else {
                    return self.invalid(
                        "resource_missing",
                        format!("No such webhook endpoint: '{after}'"),
                        "starting_after",
                    );
                };
                let rest = &all[i + 1..];
                (
                    rest.iter().take(limit).copied().collect(),
                    rest.len() > limit,
                )
            }
            (None, Some(before)) => {
                let Some(i) = position(&before) else {
                    return self.invalid(
                        "resource_missing",
                        format!("No such webhook endpoint: '{before}'"),
                        "ending_before",
                    );
                };
                let head = &all[..i];
                let from = head.len().saturating_sub(limit);
                (head[from..].to_vec(), from > 0)
            }
            (None, None) => (all.iter().take(limit).copied().collect(), all.len() > limit),
        };
        let data: Vec<Value> = page
            .iter()
            .map(|e| render_endpoint(e, self.acct.mode, self.ctx.app_id, None))
            .collect();
        Reply::ok(
            json!({ "object": "list", "data": data, "has_more": has_more, "url": "/v1/webhook_endpoints" }),
        )
    }

    fn retrieve_endpoint(&self, id: &str) -> Reply {
        match self.acct.endpoints.iter().find(|e| e.id == id) {
            Some(e) => Reply::ok(render_endpoint(e, self.acct.mode, self.ctx.app_id, None)),
            None => self.missing_endpoint(id),
        }
    }

    fn update_endpoint(&mut self, id: &str, body: &[u8]) -> Reply {
        let Some(i) = self.acct.endpoints.iter().position(|e| e.id == id) else {
            return self.missing_endpoint(id);
        };
        let form = match Form::parse(body) {
            Ok(f) => f,
            Err(e) => return self.invalid("parameter_invalid", e, "body"),
        };
        if let Err(r) = form.only(
            self,
            &["url", "description", "disabled"],
            &["enabled_events"],
            &["metadata"],
        ) {
            return r;
        }
        if let Some(url) = form.scalars.get("url")
            && let Err(r) = self.check_url(url)
        {
            return r;
        }
        if let Some(events) = form.arrays.get("enabled_events")
            && let Err(r) = self.check_events(events)
        {
            return r;
        }
        let disabled = match form.scalars.get("disabled").map(String::as_str) {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(_) => {
                return self.invalid(
                    "parameter_invalid",
                    "disabled must be true or false",
                    "disabled",
                );
            }
        };
        let e = &mut self.acct.endpoints[i];
        if let Some(url) = form.scalars.get("url") {
            e.url = url.clone();
        }
        if let Some(events) = form.arrays.get("enabled_events").filter(|v| !v.is_empty()) {
            e.enabled_events = events.clone();
        }
        if let Some(d) = form.scalars.get("description") {
            e.description = Some(d.clone()).filter(|d| !d.is_empty());
        }
        if let Some(m) = form.maps.get("metadata") {
            for (k, v) in m {
                if v.is_empty() {
                    e.metadata.remove(k);
                } else {
                    e.metadata.insert(k.clone(), v.clone());
                }
            }
        }
        if let Some(d) = disabled {
            e.disabled = d;
        }
        let e = &self.acct.endpoints[i];
        Reply::ok(render_endpoint(e, self.acct.mode, self.ctx.app_id, None))
    }

    fn delete_endpoint(&mut self, id: &str) -> Reply {
        let Some(i) = self.acct.endpoints.iter().position(|e| e.id == id) else {
            return self.missing_endpoint(id);
        };
        let e = self.acct.endpoints.remove(i);
        Reply::ok(json!({ "id": e.id, "object": "webhook_endpoint", "deleted": true }))
    }
}

/// Form body in Stripe's bracket notation.
struct Form {
    scalars: BTreeMap<String, String>,
    arrays: BTreeMap<String, Vec<String>>,
    maps: BTreeMap<String, BTreeMap<String, String>>,
}

impl Form {
    fn parse(body: &[u8]) -> Result<Self, String> {
        let mut f = Form {
            scalars: BTreeMap::new(),
            arrays: BTreeMap::new(),
            maps: BTreeMap::new(),
        };
        for (k, v) in url::form_urlencoded::parse(body) {
            let (k, v) = (k.into_owned(), v.into_owned());
            if let Some(open) = k.find('[') {
                let Some(inner) = k[open + 1..].strip_suffix(']') else {
                    return Err(format!("Invalid parameter name {k:?}"));
                };
                let base = k[..open].to_owned();
                if inner.is_empty() || inner.bytes().all(|b| b.is_ascii_digit()) {
                    f.arrays.entry(base).or_default().push(v);
                } else {
                    f.maps.entry(base).or_default().insert(inner.to_owned(), v);
                }
            } else {
                if f.scalars.contains_key(&k) {
                    return Err(format!("Parameter {k:?} given more than once"));
                }
                f.scalars.insert(k, v);
            }
        }
        Ok(f)
    }

    fn only(
        &self,
        h: &Handler<'_, '_>,
        scalars: &[&str],
        arrays: &[&str],
        maps: &[&str],
    ) -> Result<(), Reply> {
        let unknown = self
            .scalars
            .keys()
            .find(|k| !scalars.contains(&k.as_str()))
            .or_else(|| self.arrays.keys().find(|k| !arrays.contains(&k.as_str())))
            .or_else(|| self.maps.keys().find(|k| !maps.contains(&k.as_str())));
        match unknown {
            Some(k) => Err(h.invalid(
                "parameter_unknown",
                format!("Received unknown parameter: {k}"),
                k,
            )),
            None => Ok(()),
        }
    }
}

fn encode_page_token(id: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("after:{id}"))
}

fn decode_page_token(token: &str) -> Option<String> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    String::from_utf8(raw)
        .ok()?
        .strip_prefix("after:")
        .map(str::to_owned)
}

/// `<resource>_read` / `<resource>_write`, lower case.
pub(crate) fn valid_permission(p: &str) -> bool {
    let base = p.strip_suffix("_read").or_else(|| p.strip_suffix("_write"));
    matches!(base, Some(b) if !b.is_empty()
        && b.as_bytes()[0].is_ascii_lowercase()
        && b.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'))
}

/// Dispatches an authenticated app call for account `acct_index`.
pub(crate) fn handle_app_call(
    state: &mut State,
    acct_index: usize,
    req: &ApiRequest<'_>,
    ctx: &Ctx<'_>,
) -> Reply {
    let State {
        accounts, tokens, ..
    } = state;
    let mut h = Handler {
        acct: &mut accounts[acct_index],
        tokens,
        acct_index,
        ctx,
    };
    let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method, segments.as_slice()) {
        ("POST", ["v2", "iam", "api_keys"]) => h.create_key(req.body),
        ("GET", ["v2", "iam", "api_keys"]) => h.list_keys(req.query),
        ("GET", ["v2", "iam", "api_keys", id]) => h.retrieve_key(id),
        ("POST", ["v2", "iam", "api_keys", id]) => h.update_key(id, req.body),
        ("POST", ["v2", "iam", "api_keys", id, "expire"]) => h.expire_key(id, req.body),
        ("POST", ["v2", "iam", "api_keys", id, "rotate"]) => h.rotate_key(id, req.body),
        ("GET", ["v2", "iam", "activity_logs"]) => {
            super::activity::list(h.acct, req.query, ctx.request_id)
        }
        ("GET", ["v2", "iam", "activity_logs", id]) => {
            super::activity::retrieve(h.acct, id, ctx.request_id)
        }
        ("POST", ["v1", "webhook_endpoints"]) => h.create_endpoint(req.body),
        ("GET", ["v1", "webhook_endpoints"]) => h.list_endpoints(req.query),
        ("GET", ["v1", "webhook_endpoints", id]) => h.retrieve_endpoint(id),
        ("POST", ["v1", "webhook_endpoints", id]) => h.update_endpoint(id, req.body),
        ("DELETE", ["v1", "webhook_endpoints", id]) => h.delete_endpoint(id),
        _ => unrecognized(req, ctx.request_id, Some(h.acct.mode)),
    }
}

/// 404 for a URL the simulator does not serve.
pub(crate) fn unrecognized(req: &ApiRequest<'_>, request_id: &str, mode: Option<Mode>) -> Reply {
    error_reply(
        404,
        "invalid_request_error",
        None,
        format!("Unrecognized request URL ({}: {}).", req.method, req.path),
        None,
        request_id,
        mode,
    )
}

/// Serves the scope-enforcing surface for a minted key. Returns the key's account (for rate
/// limiting and the log) and the answer.
pub(crate) fn handle_scoped_call(
    state: &mut State,
    token: Option<&str>,
    route: &'static Route,
    req: &ApiRequest<'_>,
    ctx: &Ctx<'_>,
) -> (Option<usize>, Reply) {
    let needed = route.permission;
    let now = ctx.now;
    let found = token.and_then(|t| state.tokens.get(t).cloned());
    let Some((ai, key_id)) = found else {
        let shown = token.map(redacted).unwrap_or_default();
        return (
            None,
            error_reply(
                401,
                "invalid_request_error",
                None,
                format!("Invalid API Key provided: {shown}"),
                None,
                ctx.request_id,
                None,
            ),
        );
    };
    let acct = &mut state.accounts[ai];
    let mode = acct.mode;
    let Some(key) = acct.keys.iter_mut().find(|k| k.id == key_id) else {
        return (
            Some(ai),
            error_reply(
                401,
                "invalid_request_error",
                None,
                "Invalid API Key provided",
                None,
                ctx.request_id,
                Some(mode),
            ),
        );
    };
    if key.is_expired(now) {
        return (
            Some(ai),
            error_reply(
                401,
                "invalid_request_error",
                Some("api_key_expired"),
                format!("Expired API Key provided: {}", redacted(&key.token)),
                None,
                ctx.request_id,
                Some(mode),
            ),
        );
    }
    if key.key_type != "secret_key" {
        return (
            Some(ai),
            error_reply(
                403,
                "invalid_request_error",
                Some("secret_key_required"),
                "This API call cannot be made with a publishable API key.",
                None,
                ctx.request_id,
                Some(mode),
            ),
        );
    }
    key.record_use(now, ctx.last_used_lag);
    if !grants(&key.permissions, needed) {
        return (
            Some(ai),
            error_reply(
                403,
                "invalid_request_error",
                None,
                format!(
                    "The provided key '{}' does not have the required permissions for this endpoint on account '{}'. Having the '{needed}' permission would allow this request to continue.",
                    redacted(&key.token),
                    acct.id
                ),
                None,
                ctx.request_id,
                Some(mode),
            ),
        );
    }
    let livemode = mode == Mode::Live;
    let path = req.path.trim_end_matches('/');
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let ["v1", "events", id] = segments.as_slice() {
        // `GET /v1/events/{id}`: the events this account created (what the simulator delivered)
        return match acct.events.get(id) {
            Some(event) => (Some(ai), Reply::ok(event.clone())),
            None => (
                Some(ai),
                error_reply(
                    404,
                    "invalid_request_error",
                    Some("resource_missing"),
                    format!("No such event: '{id}'"),
                    Some("id"),
                    ctx.request_id,
                    Some(mode),
                ),
            ),
        };
    }
    (
        Some(ai),
        Reply::ok(scoped_body(route, req.method, &segments, livemode)),
    )
}

/// A plausible answer of a scope-enforcing route (the simulator keeps no such objects): the
/// balance, a refund, an empty list, or the object named by the path.
fn scoped_body(route: &Route, method: &str, segments: &[&str], livemode: bool) -> Value {
    let object = route
        .permission
        .strip_suffix("_read")
        .or_else(|| route.permission.strip_suffix("_write"))
        .unwrap_or(route.permission);
    let ends_with_id = route.pattern.ends_with("{id}");
    let last = segments.last().copied().unwrap_or_default();
    match (method, route.pattern) {
        ("GET", "/v1/balance") => {
            json!({ "object": "balance", "available": [], "pending": [], "livemode": livemode })
        }
        ("POST", "/v1/refunds") => json!({
            "id": format!("re_{}", random_alnum(24)),
            "object": "refund",
            "status": "succeeded",
            "livemode": livemode,
        }),
        ("GET", _) if !ends_with_id => json!({
            "object": "list",
            "data": [],
            "has_more": false,
            "url": format!("/{}", segments.join("/")),
        }),
        ("DELETE", _) => json!({ "id": last, "object": object, "deleted": true }),
        ("POST", _) if !route.pattern.contains("{id}") => json!({
            "id": format!("{object}_{}", random_alnum(24)),
            "object": object,
            "livemode": livemode,
        }),
        _ => json!({ "id": last, "object": object, "livemode": livemode }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_names_are_resource_read_or_write() {
        assert!(valid_permission("charge_read"));
        assert!(valid_permission("payment_intent_write"));
        for bad in [
            "",
            "_read",
            "charge",
            "Charge_read",
            "charge_admin",
            "charge read",
        ] {
            assert!(!valid_permission(bad), "{bad}");
        }
    }

    #[test]
    fn redaction_keeps_prefix_and_last_four() {
        assert_eq!(redacted("rk_test_abcdefgh1234"), "rk_test_...1234");
    }

    #[test]
    fn page_tokens_round_trip() {
        assert_eq!(
            decode_page_token(&encode_page_token("apikey_1")).as_deref(),
            Some("apikey_1")
        );
        assert_eq!(decode_page_token("!!"), None);
    }

    #[test]
    fn form_parses_bracket_arrays_and_maps() {
        let f = Form::parse(
            b"url=https%3A%2F%2Fx&enabled_events[]=a.b&enabled_events[1]=c&metadata[k]=v",
        )
        .unwrap();
        assert_eq!(f.scalars["url"], "https://x");
        assert_eq!(f.arrays["enabled_events"], vec!["a.b", "c"]);
        assert_eq!(f.maps["metadata"]["k"], "v");
        assert!(Form::parse(b"a=1&a=2").is_err());
    }
}
