//! The simulated account activity log (`GET /v2/iam/activity_logs`, Stripe's public preview):
//! the security history of an account, newest first. Entries are recorded when keys are
//! created, updated, rotated or expired through the API (actor: the calling app key) and when a
//! person acts in the simulated Dashboard (actor: a user with an email; see
//! [`super::SimHandle::dashboard_view_key`] and its siblings).

use std::collections::VecDeque;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::api::{Reply, error_reply};
use super::state::{Account, KeyRecord};
use crate::stripe::config::Mode;

/// Most entries kept per account; the oldest is forgotten first.
pub(crate) const MAX_ENTRIES: usize = 10_000;

/// Action groups and the actions in them that the simulator records or accepts as filters.
pub(crate) const ACTION_GROUPS: &[(&str, &[&str])] = &[
    (
        "api_key",
        &[
            "api_key_created",
            "api_key_updated",
            "api_key_deleted",
            "api_key_viewed",
            "api_key_rotated",
        ],
    ),
    (
        "account_security",
        &["two_factor_enabled", "two_factor_disabled"],
    ),
    ("authentication", &["user_logged_in", "user_logged_out"]),
    ("user_roles", &["user_invited", "user_role_updated"]),
];

fn group_of(action: &str) -> Option<&'static str> {
    ACTION_GROUPS
        .iter()
        .find(|(_, actions)| actions.contains(&action))
        .map(|(g, _)| *g)
}

/// Who did something: an API key (by id) or a person in the Dashboard (by email).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum SimActor {
    /// An API key (the app's secret key for calls through the API).
    ApiKey {
        /// The key's id.
        id: String,
    },
    /// A person signed in to the Dashboard.
    User {
        /// Their email.
        email: String,
    },
}

impl SimActor {
    fn render(&self) -> Value {
        match self {
            SimActor::ApiKey { id } => json!({"type": "api_key", "api_key": {"id": id}}),
            SimActor::User { email } => json!({"type": "user", "user": {"email": email}}),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub id: String,
    pub action: String,
    pub actor: SimActor,
    pub created: DateTime<Utc>,
    pub details: Value,
}

/// One account's activity log, oldest first.
#[derive(Debug, Default)]
pub(crate) struct ActivityLog {
    entries: VecDeque<Entry>,
    seq: u64,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `details.api_key` of an entry about `k` (no token, ever).
pub(crate) fn key_details(k: &KeyRecord, app_id: &str) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "note": k.note,
        "type": k.key_type,
        "created": rfc3339(k.created),
        "expires_at": k.expires_at.map(rfc3339),
        "ip_allowlist": [],
        "managed_by": if k.dashboard_created {
            Value::Null
        } else {
            json!({"type": "application", "application": {"id": app_id}})
        },
    })
}

impl ActivityLog {
    /// Records an entry about a key.
    pub(crate) fn record_key(
        &mut self,
        action: &str,
        actor: SimActor,
        now: DateTime<Utc>,
        key: &KeyRecord,
        app_id: &str,
        new_key: Option<&KeyRecord>,
    ) {
        let mut api_key = key_details(key, app_id);
        if let Some(n) = new_key {
            api_key["new_key"] = key_details(n, app_id);
        }
        self.seq += 1;
        self.entries.push_back(Entry {
            // The sequence keeps ids unique and sortable; the suffix makes them opaque.
            id: format!("actlog_{:012}{}", self.seq, super::state::random_alnum(12)),
            action: action.to_owned(),
            actor,
            created: now,
            details: json!({"type": "api_key", "api_key": api_key}),
        });
        while self.entries.len() > MAX_ENTRIES {
            self.entries.pop_front();
        }
    }

    /// Every entry, oldest first (for the control API and tests).
    pub(crate) fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }
}

fn render(e: &Entry, account: &str, mode: Mode) -> Value {
    json!({
        "id": e.id,
        "object": "v2.iam.activity_log",
        "type": e.action,
        "actor": e.actor.render(),
        "context": account,
        "created": rfc3339(e.created),
        "livemode": mode == Mode::Live,
        "details": e.details,
    })
}

/// The base of a filter parameter name: `actions`, `actions[]` and `actions[3]` are all `actions`.
fn base_name(k: &str) -> &str {
    match k.find('[') {
        Some(i) if k.ends_with(']') => &k[..i],
        _ => k,
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

/// `GET /v2/iam/activity_logs`: newest first, `limit` (1–100, default 10), filters
/// `action_groups` and `actions` (repeated, or `[]`/`[n]` suffixed; an entry must match both
/// when both are given), paged with `next_page_url`.
pub(crate) fn list(acct: &Account, query: &str, request_id: &str) -> Reply {
    let invalid = |code: &str, msg: String, param: &str| {
        error_reply(
            400,
            "invalid_request_error",
            Some(code),
            msg,
            Some(param),
            request_id,
            Some(acct.mode),
        )
    };
    let mut limit = 10usize;
    let mut groups: Vec<String> = Vec::new();
    let mut actions: Vec<String> = Vec::new();
    let mut page: Option<String> = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match base_name(&k) {
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=100).contains(&n) => limit = n,
                _ => {
                    return invalid(
                        "parameter_invalid",
                        "limit must be an integer between 1 and 100".into(),
                        "limit",
                    );
                }
            },
            "action_groups" => {
                if !ACTION_GROUPS.iter().any(|(g, _)| *g == v) {
                    return invalid(
                        "parameter_invalid",
                        format!("Invalid action group {v:?}"),
                        "action_groups",
                    );
                }
                groups.push(v.into_owned());
            }
            "actions" => {
                if group_of(&v).is_none() {
                    return invalid(
                        "parameter_invalid",
                        format!("Invalid action {v:?}"),
                        "actions",
                    );
                }
                actions.push(v.into_owned());
            }
            "page" => page = Some(v.into_owned()),
            other => {
                return invalid(
                    "parameter_unknown",
                    format!("Received unknown parameter: {other}"),
                    other,
                );
            }
        }
    }
    let matches = |e: &Entry| {
        (groups.is_empty() || group_of(&e.action).is_some_and(|g| groups.iter().any(|x| x == g)))
            && (actions.is_empty() || actions.contains(&e.action))
    };
    let newest_first: Vec<&Entry> = acct.activity.entries.iter().rev().collect();
    let start = match &page {
        None => 0,
        Some(token) => match decode_page_token(token)
            .and_then(|id| newest_first.iter().position(|e| e.id == id))
        {
            Some(i) => i + 1,
            None => return invalid("parameter_invalid", "Invalid page token".into(), "page"),
        },
    };
    let visible: Vec<&Entry> = newest_first[start..]
        .iter()
        .copied()
        .filter(|e| matches(e))
        .collect();
    let shown: Vec<&Entry> = visible.iter().take(limit).copied().collect();
    let next = if shown.len() < visible.len() {
        shown.last().map(|last| {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            for g in &groups {
                q.append_pair("action_groups", g);
            }
            for a in &actions {
                q.append_pair("actions", a);
            }
            q.append_pair("limit", &limit.to_string());
            q.append_pair("page", &encode_page_token(&last.id));
            format!("/v2/iam/activity_logs?{}", q.finish())
        })
    } else {
        None
    };
    let data: Vec<Value> = shown
        .iter()
        .map(|e| render(e, &acct.id, acct.mode))
        .collect();
    Reply::ok(json!({ "data": data, "next_page_url": next, "previous_page_url": null }))
}

/// `GET /v2/iam/activity_logs/{id}`.
pub(crate) fn retrieve(acct: &Account, id: &str, request_id: &str) -> Reply {
    match acct.activity.entries.iter().find(|e| e.id == id) {
        Some(e) => Reply::ok(render(e, &acct.id, acct.mode)),
        None => error_reply(
            404,
            "invalid_request_error",
            Some("resource_missing"),
            format!("No such activity log: '{id}'"),
            Some("id"),
            request_id,
            Some(acct.mode),
        ),
    }
}

/// One entry as the control API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityEntryState {
    /// `actlog_...`.
    pub id: String,
    /// `api_key_viewed`, ...
    pub action: String,
    /// Who.
    pub actor: SimActor,
    /// When (simulator clock).
    pub created: DateTime<Utc>,
    /// `details.api_key.id`.
    pub key_id: Option<String>,
}

impl From<&Entry> for ActivityEntryState {
    fn from(e: &Entry) -> Self {
        Self {
            id: e.id.clone(),
            action: e.action.clone(),
            actor: e.actor.clone(),
            created: e.created,
            key_id: e
                .details
                .pointer("/api_key/id")
                .and_then(Value::as_str)
                .map(str::to_owned),
        }
    }
}

/// What a person does to a key in the (simulated) Dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum DashboardAction {
    /// Reveals a key's secret ("Reveal key"): the person may have copied it.
    View {
        /// The key.
        key_id: String,
    },
    /// Edits a key's name and/or permissions.
    Update {
        /// The key.
        key_id: String,
        /// A new name.
        #[serde(default)]
        name: Option<String>,
        /// New permissions (an empty list changes nothing, as through the API).
        #[serde(default)]
        permissions: Option<Vec<String>>,
    },
    /// Expires ("deletes") a key now.
    Expire {
        /// The key.
        key_id: String,
    },
    /// Creates a restricted key by hand.
    Create {
        /// Its name.
        name: String,
        /// Its permissions.
        #[serde(default)]
        permissions: Vec<String>,
    },
}

/// Plays a person (`email`) acting in the Dashboard of `account`: changes the key like the
/// Dashboard would and records the activity-log entry (actor `user`). Returns the key id.
pub(crate) fn dashboard(
    st: &mut super::state::State,
    app_id: &str,
    account: &str,
    email: &str,
    action: DashboardAction,
) -> Result<String, super::SimError> {
    use super::SimError;
    if email.is_empty() {
        return Err(SimError::InvalidRequest("email is empty".into()));
    }
    let now = st.clock.now();
    let ai = st
        .account_index(account)
        .ok_or_else(|| SimError::NotFound(format!("account {account}")))?;
    let actor = SimActor::User {
        email: email.to_owned(),
    };
    let find = |acct: &Account, id: &str| {
        acct.keys
            .iter()
            .position(|k| k.id == id)
            .ok_or_else(|| SimError::NotFound(format!("api key {id}")))
    };
    let check = |perms: &[String]| match perms.iter().find(|p| !super::api::valid_permission(p)) {
        Some(p) => Err(SimError::InvalidRequest(format!(
            "invalid permission {p:?}"
        ))),
        None => Ok(()),
    };
    let (action_name, key) = match action {
        DashboardAction::View { key_id } => {
            let acct = &st.accounts[ai];
            let i = find(acct, &key_id)?;
            ("api_key_viewed", acct.keys[i].clone())
        }
        DashboardAction::Update {
            key_id,
            name,
            permissions,
        } => {
            if let Some(p) = &permissions {
                check(p)?;
            }
            let acct = &mut st.accounts[ai];
            let i = find(acct, &key_id)?;
            let k = &mut acct.keys[i];
            if let Some(n) = name {
                k.name = Some(n);
            }
            if let Some(p) = permissions.filter(|p| !p.is_empty()) {
                k.permissions = p;
            }
            ("api_key_updated", k.clone())
        }
        DashboardAction::Expire { key_id } => {
            let acct = &mut st.accounts[ai];
            let i = find(acct, &key_id)?;
            let k = &mut acct.keys[i];
            if !k.is_expired(now) {
                k.expires_at = Some(now);
            }
            ("api_key_deleted", k.clone())
        }
        DashboardAction::Create { name, permissions } => {
            check(&permissions)?;
            let mode = st.accounts[ai].mode;
            let tag = match mode {
                Mode::Test => "test",
                Mode::Live => "live",
            };
            let rec = KeyRecord {
                id: format!("apikey_{}", super::state::random_alnum(24)),
                key_type: "secret_key".into(),
                name: Some(name),
                note: None,
                permissions,
                connect_permissions: Vec::new(),
                token: format!("rk_{tag}_{}", super::state::random_alnum(99)),
                created: now,
                expires_at: None,
                last_used: None,
                unreported_uses: Vec::new(),
                rotated_to: None,
                dashboard_created: true,
            };
            st.tokens.insert(rec.token.clone(), (ai, rec.id.clone()));
            st.accounts[ai].keys.push(rec.clone());
            ("api_key_created", rec)
        }
    };
    st.accounts[ai]
        .activity
        .record_key(action_name, actor, now, &key, app_id, None);
    Ok(key.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::state::{ClockMode, State};

    fn key(id: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            key_type: "secret_key".into(),
            name: Some("n".into()),
            note: None,
            permissions: vec![],
            connect_permissions: vec![],
            token: "rk_test_secret_never_shown".into(),
            created: Utc::now(),
            expires_at: None,
            last_used: None,
            unreported_uses: vec![],
            rotated_to: None,
            dashboard_created: false,
        }
    }

    fn state_with(actions: &[&str]) -> State {
        let mut s = State::new(
            &[("acct_1".to_owned(), Mode::Test)],
            ClockMode::Real,
            25,
            100,
        );
        let now = Utc::now();
        for (i, a) in actions.iter().enumerate() {
            s.accounts[0].activity.record_key(
                a,
                SimActor::User {
                    email: "a@example.com".into(),
                },
                now,
                &key(&format!("apikey_{i}")),
                "ca_1",
                None,
            );
        }
        s
    }

    fn body(r: &Reply) -> &Value {
        assert_eq!(r.status, 200, "{}", r.body);
        &r.body
    }

    fn ids(v: &Value) -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["details"]["api_key"]["id"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn activity_log_lists_newest_first_filters_and_pages_to_the_end() {
        let actions = [
            "api_key_created",
            "api_key_viewed",
            "api_key_updated",
            "api_key_viewed",
            "api_key_deleted",
            "api_key_viewed",
        ];
        let s = state_with(&actions);
        let acct = &s.accounts[0];
        // newest first, default filters
        let all = list(acct, "limit=100", "req_1");
        assert_eq!(
            ids(body(&all)),
            [
                "apikey_5", "apikey_4", "apikey_3", "apikey_2", "apikey_1", "apikey_0"
            ]
        );
        assert!(body(&all)["next_page_url"].is_null());
        let first = &body(&all)["data"][0];
        assert_eq!(first["object"], "v2.iam.activity_log");
        assert_eq!(first["type"], "api_key_viewed");
        assert_eq!(first["actor"]["type"], "user");
        assert_eq!(first["actor"]["user"]["email"], "a@example.com");
        assert_eq!(first["context"], "acct_1");
        assert!(!body(&all).to_string().contains("rk_test_"), "no token");
        // `actions` filter, paged two at a time: follow next_page_url to the end
        let mut seen = Vec::new();
        let mut query = "actions=api_key_viewed&limit=2".to_owned();
        let mut pages = 0;
        loop {
            let r = list(acct, &query, "req_1");
            seen.extend(ids(body(&r)));
            pages += 1;
            match body(&r)["next_page_url"].as_str() {
                Some(next) => {
                    query = next
                        .strip_prefix("/v2/iam/activity_logs?")
                        .unwrap()
                        .to_owned()
                }
                None => break,
            }
        }
        assert_eq!(seen, ["apikey_5", "apikey_3", "apikey_1"]);
        assert_eq!(pages, 2);
        // bracketed array form, two actions
        let r = list(
            acct,
            "actions[]=api_key_created&actions[]=api_key_deleted",
            "req_1",
        );
        assert_eq!(ids(body(&r)), ["apikey_4", "apikey_0"]);
        // groups: every key action is in `api_key`, none in `authentication`
        assert_eq!(
            ids(body(&list(acct, "action_groups=api_key&limit=100", "r"))).len(),
            6
        );
        assert!(ids(body(&list(acct, "action_groups=authentication", "r"))).is_empty());
    }

    #[test]
    fn activity_log_refuses_bad_parameters_the_stripe_way() {
        let s = state_with(&["api_key_viewed"]);
        let acct = &s.accounts[0];
        for (q, param) in [
            ("limit=0", "limit"),
            ("limit=101", "limit"),
            ("actions=api_key_eaten", "actions"),
            ("action_groups=nope", "action_groups"),
            ("page=bogus", "page"),
            ("starting_after=x", "starting_after"),
        ] {
            let r = list(acct, q, "req_9");
            assert_eq!(r.status, 400, "{q}");
            assert_eq!(r.body["error"]["type"], "invalid_request_error", "{q}");
            assert_eq!(r.body["error"]["param"], param, "{q}");
        }
        let r = retrieve(acct, "actlog_missing", "req_9");
        assert_eq!(r.status, 404);
        assert_eq!(r.body["error"]["code"], "resource_missing");
        let id = acct.activity.entries().next().unwrap().id.clone();
        let r = retrieve(acct, &id, "req_9");
        assert_eq!(body(&r)["id"], id.as_str());
    }
}
