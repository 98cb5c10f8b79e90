//! Stripe object shapes and request parameters (`v2.iam.api_key`, `webhook_endpoint`).
//!
//! Unknown response fields are ignored, so additive API changes do not break decoding.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

use crate::secret::SecretString;

fn de_secret_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(SecretString::new))
}

fn de_null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `type` of an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKeyType {
    /// A secret (restricted) key, `rk_test_...` / `rk_live_...`.
    SecretKey,
    /// A publishable key, `pk_...`.
    PublishableKey,
    /// A type this client does not know yet.
    #[serde(other)]
    Unknown,
}

/// `status` of an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKeyStatus {
    /// The key authenticates.
    Active,
    /// The key expired (explicitly, by rotation, or at `expires_at`).
    Expired,
    /// A status this client does not know yet.
    #[serde(other)]
    Unknown,
}

/// A v2 API key (`object: "v2.iam.api_key"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ApiKey {
    /// Key id (not secret).
    pub id: String,
    /// Always `v2.iam.api_key`.
    pub object: String,
    /// Secret or publishable.
    #[serde(rename = "type")]
    pub key_type: ApiKeyType,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Free-form note.
    #[serde(default)]
    pub note: Option<String>,
    /// Active or expired.
    pub status: ApiKeyStatus,
    /// Creation time (RFC 3339).
    pub created: DateTime<Utc>,
    /// When the key stops (or stopped) authenticating.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Last use, if Stripe tracked one.
    #[serde(default)]
    pub last_used: Option<DateTime<Utc>>,
    /// Live or test mode.
    pub livemode: bool,
    /// IPv4 addresses/CIDRs allowed to use the key (empty: any).
    #[serde(default, deserialize_with = "de_null_default")]
    pub ip_allowlist: Vec<String>,
    /// Who manages the key (`{type: "application", application: {id}}`).
    #[serde(default)]
    pub managed_by: Option<ManagedBy>,
    /// Present for publishable keys.
    #[serde(default)]
    pub publishable_key: Option<PublishableKeyToken>,
    /// Present for secret keys.
    #[serde(default)]
    pub secret_key: Option<SecretKeyToken>,
    /// What the key may do (permission names such as `charge_read`), as Stripe reports it.
    /// `None` when the answer carried no `permissions` field (or `null`): then the key's scopes
    /// cannot be verified from the answer (see
    /// [`verify_response_scopes`](super::verify::verify_response_scopes)).
    #[serde(default)]
    pub permissions: Option<Vec<String>>,
    /// Connect permission names, when Stripe reports them.
    #[serde(default)]
    pub connect_permissions: Option<Vec<String>>,
}

impl ApiKey {
    /// The secret token as Stripe returned it: plaintext in test mode, `None` when it is only
    /// available encrypted (live mode) or not at all (live-mode retrieve).
    pub fn plaintext_secret(&self) -> Option<&SecretString> {
        self.secret_key.as_ref().and_then(|s| s.token.as_ref())
    }

    /// The compact JWE holding the live-mode secret (only on create and rotate).
    pub fn encrypted_secret(&self) -> Option<&EncryptedSecret> {
        self.secret_key
            .as_ref()
            .and_then(|s| s.encrypted_secret.as_ref())
    }

    /// The secret in plaintext: the test-mode token, or the live-mode JWE decrypted with `keys`.
    /// `Ok(None)` when the response carries neither.
    pub fn reveal_secret(
        &self,
        keys: &super::jwe::JweKeyPair,
    ) -> Result<Option<SecretString>, super::jwe::JweError> {
        if let Some(token) = self.plaintext_secret() {
            return Ok(Some(token.clone()));
        }
        match self.encrypted_secret() {
            Some(enc) if enc.format == "jwe_compact" => keys.decrypt(&enc.ciphertext).map(Some),
            Some(enc) => Err(super::jwe::JweError::Malformed(format!(
                "encrypted_secret has format {:?}; only jwe_compact is supported",
                enc.format
            ))),
            None => Ok(None),
        }
    }
}

/// `managed_by` of an API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedBy {
    /// `application`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The managing application.
    #[serde(default)]
    pub application: Option<ManagedByApplication>,
}

/// The application managing a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedByApplication {
    /// Application id.
    pub id: String,
}

/// `publishable_key` of an API key (the token is public by design).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PublishableKeyToken {
    /// `pk_...`.
    pub token: String,
}

/// `secret_key` of an API key. `Debug` never shows the token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SecretKeyToken {
    /// Plaintext token (test mode only).
    #[serde(default, deserialize_with = "de_secret_opt")]
    pub token: Option<SecretString>,
    /// Redacted form for display (e.g. `rk_live_...abcd`).
    #[serde(default)]
    pub secret_token_redacted: Option<String>,
    /// The live-mode secret, encrypted to the caller's public key (create/rotate only).
    #[serde(default)]
    pub encrypted_secret: Option<EncryptedSecret>,
}

/// An encrypted secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EncryptedSecret {
    /// The compact JWE.
    pub ciphertext: String,
    /// `jwe_compact`.
    pub format: String,
    /// The `public_key.id` the secret was encrypted to, if the caller named one.
    #[serde(default)]
    pub recipient_key_id: Option<String>,
}

/// A page of API keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ApiKeyList {
    /// The keys of this page.
    pub data: Vec<ApiKey>,
    /// Path and query of the next page, `None` on the last page.
    #[serde(default)]
    pub next_page_url: Option<String>,
    /// Path and query of the previous page.
    #[serde(default)]
    pub previous_page_url: Option<String>,
}

/// `public_key` parameter of create and rotate (the RSA key the live secret is encrypted to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeyParam {
    /// Optional identifier echoed as `encrypted_secret.recipient_key_id`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
    /// The key itself.
    pub pem_key: PemKey,
}

/// A PEM-encoded public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PemKey {
    /// `RSA`.
    pub algorithm: String,
    /// SubjectPublicKeyInfo PEM.
    pub data: String,
}

/// Parameters of `POST /v2/iam/api_keys`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CreateApiKeyParams {
    /// Secret or publishable.
    #[serde(rename = "type")]
    pub key_type: ApiKeyType,
    /// Display name (the operator puts its prefix here to recognise its own keys).
    pub name: String,
    /// Free-form note.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Permission names, e.g. `charge_read`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// Connect permission names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_permissions: Option<Vec<String>>,
    /// Hard expiry of the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The RSA public key the live secret is encrypted to. Required for secret keys in live
    /// mode; whether test mode requires it is unconfirmed (send one for secret keys anyway).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKeyParam>,
}

/// Parameters of `POST /v2/iam/api_keys/{id}`. `None` fields are not sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UpdateApiKeyParams {
    /// New name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// New note.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// New permissions. Beware: Stripe answers 200 to `[]` and changes nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Vec<String>>,
    /// New Connect permissions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_permissions: Option<Vec<String>>,
}

/// Parameters of `POST /v2/iam/api_keys/{id}/rotate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RotateApiKeyParams {
    /// Minutes the current key keeps working (max 10080). `None`: it dies at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expire_current_key_in_minutes: Option<u32>,
    /// The RSA key the new live secret is encrypted to: required for secret keys in live mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKeyParam>,
}

/// Who acted in an activity-log entry: an API key (by id) or a person (by email).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ActivityLogActor {
    /// `api_key` or `user` (others may appear: kept as is).
    #[serde(rename = "type")]
    pub kind: String,
    /// Set when `type` is `api_key`.
    #[serde(default)]
    pub api_key: Option<ActivityLogActorKey>,
    /// Set when `type` is `user`.
    #[serde(default)]
    pub user: Option<ActivityLogActorUser>,
}

impl ActivityLogActor {
    /// The acting API key's id, when an API key acted.
    pub fn api_key_id(&self) -> Option<&str> {
        (self.kind == "api_key")
            .then(|| self.api_key.as_ref().map(|k| k.id.as_str()))
            .flatten()
    }

    /// The person's email, when a person acted.
    pub fn user_email(&self) -> Option<&str> {
        (self.kind == "user")
            .then(|| self.user.as_ref().map(|u| u.email.as_str()))
            .flatten()
    }

    /// `api_key apikey_...`, `user a@example.com` or the bare type: for Events and status.
    pub fn describe(&self) -> String {
        match (self.api_key_id(), self.user_email()) {
            (Some(id), _) => format!("api_key {id}"),
            (_, Some(email)) => format!("user {email}"),
            _ => self.kind.clone(),
        }
    }
}

/// `actor.api_key` of an activity-log entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ActivityLogActorKey {
    /// The key's id.
    pub id: String,
}

/// `actor.user` of an activity-log entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ActivityLogActorUser {
    /// The person's email.
    pub email: String,
}

/// `details.api_key` of an activity-log entry (never a secret).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ActivityLogApiKey {
    /// The key's id.
    pub id: String,
    /// Its name.
    #[serde(default)]
    pub name: Option<String>,
    /// Its note.
    #[serde(default)]
    pub note: Option<String>,
    /// `secret_key` or `publishable_key`.
    #[serde(default, rename = "type")]
    pub key_type: Option<String>,
    /// When it was created.
    #[serde(default)]
    pub created: Option<DateTime<Utc>>,
    /// When it expires.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Who manages it.
    #[serde(default)]
    pub managed_by: Option<ManagedBy>,
    /// The key a rotation made (`api_key_rotated`).
    #[serde(default)]
    pub new_key: Option<Box<ActivityLogApiKey>>,
}

/// `details` of an activity-log entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ActivityLogDetails {
    /// What the details describe (`api_key`, ...).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Set for API-key entries.
    #[serde(default)]
    pub api_key: Option<ActivityLogApiKey>,
}

/// One entry of the account's activity log (`object: "v2.iam.activity_log"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ActivityLog {
    /// Entry id.
    pub id: String,
    /// The action, e.g. `api_key_viewed`.
    #[serde(rename = "type")]
    pub action: String,
    /// Who acted.
    pub actor: ActivityLogActor,
    /// The account (`acct_...`).
    #[serde(default)]
    pub context: Option<String>,
    /// When (RFC 3339).
    pub created: DateTime<Utc>,
    /// Live or test mode.
    #[serde(default)]
    pub livemode: bool,
    /// What the entry is about.
    #[serde(default)]
    pub details: Option<ActivityLogDetails>,
}

impl ActivityLog {
    /// `details.api_key`, when the entry is about an API key.
    pub fn api_key(&self) -> Option<&ActivityLogApiKey> {
        self.details.as_ref().and_then(|d| d.api_key.as_ref())
    }
}

/// A page of activity-log entries, newest first.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ActivityLogList {
    /// The entries of this page.
    pub data: Vec<ActivityLog>,
    /// Path and query of the next (older) page, `None` on the last page.
    #[serde(default)]
    pub next_page_url: Option<String>,
}

/// Query of `GET /v2/iam/activity_logs`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListActivityLogsParams {
    /// Only these action groups (`api_key`, `account_security`, ...).
    pub action_groups: Vec<String>,
    /// Only these actions (`api_key_viewed`, ...).
    pub actions: Vec<String>,
    /// Page size, at most 100.
    pub limit: Option<u32>,
}

/// Query of `GET /v2/iam/api_keys`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ListApiKeysParams {
    /// Include expired keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_expired: Option<bool>,
    /// Page size, at most 100.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// `status` of a webhook endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEndpointStatus {
    /// Receives events.
    Enabled,
    /// Disabled (by the owner or by Stripe after failures).
    Disabled,
    /// A status this client does not know yet.
    #[serde(other)]
    Unknown,
}

/// A v1 webhook endpoint (`object: "webhook_endpoint"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WebhookEndpoint {
    /// `we_...`.
    pub id: String,
    /// Always `webhook_endpoint`.
    pub object: String,
    /// Where events are delivered.
    pub url: String,
    /// Event types delivered (`["*"]` for all).
    pub enabled_events: Vec<String>,
    /// API version events are rendered with (`None`: the account default).
    #[serde(default)]
    pub api_version: Option<String>,
    /// The application that created it.
    #[serde(default)]
    pub application: Option<String>,
    /// Creation time, unix seconds.
    pub created: i64,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
    /// Live or test mode.
    pub livemode: bool,
    /// Metadata.
    #[serde(default, deserialize_with = "de_null_default")]
    pub metadata: BTreeMap<String, String>,
    /// Enabled or disabled.
    pub status: WebhookEndpointStatus,
    /// The signing secret `whsec_...`: present only in the response to create.
    #[serde(default, deserialize_with = "de_secret_opt")]
    pub secret: Option<SecretString>,
}

/// A page of webhook endpoints (v1 list object).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WebhookEndpointList {
    /// The endpoints of this page, newest first.
    pub data: Vec<WebhookEndpoint>,
    /// Whether more pages follow (`starting_after` = the last id of this page).
    pub has_more: bool,
    /// The list's path.
    #[serde(default)]
    pub url: Option<String>,
}

/// Answer to `DELETE /v1/webhook_endpoints/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DeletedWebhookEndpoint {
    /// The deleted endpoint's id.
    pub id: String,
    /// `webhook_endpoint`.
    pub object: String,
    /// `true`.
    pub deleted: bool,
}

/// Parameters of `POST /v1/webhook_endpoints` (sent form-encoded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateWebhookEndpointParams {
    /// Receiver URL.
    pub url: String,
    /// Event types, or `["*"]`.
    pub enabled_events: Vec<String>,
    /// API version to render events with.
    pub api_version: Option<String>,
    /// Receive events from connected accounts.
    pub connect: Option<bool>,
    /// Description.
    pub description: Option<String>,
    /// Metadata (`metadata[k]=v`).
    pub metadata: BTreeMap<String, String>,
}

impl CreateWebhookEndpointParams {
    /// The form fields in Stripe's bracket notation.
    pub fn to_form(&self) -> Vec<(String, String)> {
        let mut form = vec![("url".to_owned(), self.url.clone())];
        for event in &self.enabled_events {
            form.push(("enabled_events[]".to_owned(), event.clone()));
        }
        if let Some(v) = &self.api_version {
            form.push(("api_version".to_owned(), v.clone()));
        }
        if let Some(c) = self.connect {
            form.push(("connect".to_owned(), c.to_string()));
        }
        if let Some(d) = &self.description {
            form.push(("description".to_owned(), d.clone()));
        }
        for (k, v) in &self.metadata {
            form.push((format!("metadata[{k}]"), v.clone()));
        }
        form
    }
}

/// Parameters of `POST /v1/webhook_endpoints/{id}` (form-encoded). `None` fields are not sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateWebhookEndpointParams {
    /// New URL.
    pub url: Option<String>,
    /// New event list (replaces the old one).
    pub enabled_events: Option<Vec<String>>,
    /// New description.
    pub description: Option<String>,
    /// Metadata to merge; an empty value removes that key.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Disable or re-enable.
    pub disabled: Option<bool>,
}

impl UpdateWebhookEndpointParams {
    /// The form fields in Stripe's bracket notation.
    pub fn to_form(&self) -> Vec<(String, String)> {
        let mut form = Vec::new();
        if let Some(u) = &self.url {
            form.push(("url".to_owned(), u.clone()));
        }
        if let Some(events) = &self.enabled_events {
            for event in events {
                form.push(("enabled_events[]".to_owned(), event.clone()));
            }
        }
        if let Some(d) = &self.description {
            form.push(("description".to_owned(), d.clone()));
        }
        if let Some(m) = &self.metadata {
            for (k, v) in m {
                form.push((format!("metadata[{k}]"), v.clone()));
            }
        }
        if let Some(d) = self.disabled {
            form.push(("disabled".to_owned(), d.to_string()));
        }
        form
    }
}

/// Query of `GET /v1/webhook_endpoints`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ListWebhookEndpointsParams {
    /// Page size, 1 to 100 (Stripe's default 10).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Cursor: the last id of the previous page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub starting_after: Option<String>,
    /// Cursor: the first id of the next page (paging backwards).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ending_before: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_decodes_the_documented_shape_without_leaking_the_token() {
        let json = r#"{"id":"apikey_123","object":"v2.iam.api_key","type":"secret_key","name":"n",
            "note":null,"status":"active","created":"2026-11-28T10:00:00Z","expires_at":null,
            "last_used":null,"livemode":false,"ip_allowlist":[],"managed_by":{"type":"application",
            "application":{"id":"ca_1"}},"secret_key":{"token":"rk_test_abcdef","secret_token_redacted":"rk_test_...cdef"},
            "some_future_field":1}"#;
        let key: ApiKey = serde_json::from_str(json).unwrap();
        assert_eq!(key.key_type, ApiKeyType::SecretKey);
        assert_eq!(key.status, ApiKeyStatus::Active);
        assert_eq!(key.plaintext_secret().unwrap().expose(), "rk_test_abcdef");
        assert!(!format!("{key:?}").contains("rk_test_abcdef"));
        assert_eq!(key.managed_by.unwrap().application.unwrap().id, "ca_1");
        assert_eq!(
            key.permissions, None,
            "an answer without permissions says so"
        );
        assert_eq!(key.connect_permissions, None);
    }

    #[test]
    fn api_key_carries_permissions_and_connect_permissions() {
        let json = r#"{"id":"apikey_1","object":"v2.iam.api_key","type":"secret_key",
            "status":"active","created":"2026-11-28T10:00:00Z","livemode":false,
            "permissions":["charge_read","refund_write"],"connect_permissions":["charge_read"]}"#;
        let key: ApiKey = serde_json::from_str(json).unwrap();
        assert_eq!(
            key.permissions.as_deref(),
            Some(&["charge_read".to_owned(), "refund_write".to_owned()][..])
        );
        assert_eq!(
            key.connect_permissions.as_deref(),
            Some(&["charge_read".to_owned()][..])
        );
        // `null` is "not reported", not "no permissions"
        let json = json.replace(r#"["charge_read","refund_write"]"#, "null");
        let key: ApiKey = serde_json::from_str(&json).unwrap();
        assert_eq!(key.permissions, None);
    }

    #[test]
    fn webhook_form_uses_bracket_notation() {
        let mut metadata = BTreeMap::new();
        metadata.insert("owner".to_owned(), "ns/name".to_owned());
        let p = CreateWebhookEndpointParams {
            url: "https://x/hook".into(),
            enabled_events: vec!["charge.succeeded".into(), "charge.failed".into()],
            metadata,
            ..Default::default()
        };
        let form = p.to_form();
        assert!(form.contains(&("enabled_events[]".into(), "charge.failed".into())));
        assert!(form.contains(&("metadata[owner]".into(), "ns/name".into())));
    }

    #[test]
    fn update_params_skip_unset_fields() {
        let p = UpdateApiKeyParams {
            note: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"note":"x"}"#);
        let r = RotateApiKeyParams::default();
        assert_eq!(serde_json::to_string(&r).unwrap(), "{}");
    }
}
