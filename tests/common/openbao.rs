//! Runs a real OpenBao server for tests, and a fake Kubernetes TokenReview endpoint.
//!
//! The server is a child process bound to 127.0.0.1 on a free port; it is killed when the
//! [`OpenBao`] value is dropped, which also happens when a test panics. A missing `bao`
//! binary fails the test with instructions (install with `make tools` (.ci/install-tools.sh)).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};

/// Where the `bao` binary is: `$BAO_BIN`, else `bao` on `PATH`. Panics with instructions.
pub fn bao_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("BAO_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "BAO_BIN={} does not exist; install OpenBao with `make tools` (.ci/install-tools.sh)",
            bin.display()
        );
        return bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("bao");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the OpenBao binary `bao` was not found on PATH and BAO_BIN is not set; \
         install it with `make tools` (it links bao into .ci/cache/bin; `make test` puts that on PATH) or set BAO_BIN"
    );
}

/// A free TCP port on 127.0.0.1 (bound to port 0, then released for the child to take).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

/// A random token-like string, so tests never share or hard-code credentials.
pub fn random_token(prefix: &str) -> String {
    let mut rng = rand::rng();
    let suffix: String = (0..24)
        .map(|_| {
            let i = rng.random_range(0..36u8);
            char::from_digit(u32::from(i), 36).unwrap()
        })
        .collect();
    format!("{prefix}{suffix}")
}

enum Mode {
    /// `bao server -dev`: in memory, unsealed, KV v2 at `secret/`.
    Dev,
    /// `bao server -config=...` with raft storage on disk: survives restarts; needs unsealing.
    Persistent { unseal_key: String },
}

/// A running OpenBao server owned by one test.
pub struct OpenBao {
    child: Option<Child>,
    port: u16,
    addr: String,
    root_token: String,
    mode: Mode,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl OpenBao {
    /// Starts a dev-mode server (in memory, unsealed) with a random root token.
    pub async fn start_dev() -> Self {
        let port = free_port();
        let root_token = random_token("root-");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bao = OpenBao {
            child: None,
            port,
            addr: format!("http://127.0.0.1:{port}"),
            root_token,
            mode: Mode::Dev,
            dir,
            http: reqwest::Client::new(),
        };
        bao.spawn();
        bao.wait_until_answering().await;
        bao
    }

    /// Starts a server with raft storage in a temporary directory, initialises it with one
    /// unseal key, unseals it, and enables KV v2 at `secret/`. Survives [`OpenBao::kill`] +
    /// [`OpenBao::restart`] (after which it is sealed until [`OpenBao::unseal`]).
    pub async fn start_persistent() -> Self {
        let port = free_port();
        let cluster_port = loop {
            let candidate = free_port();
            if candidate != port {
                break candidate;
            }
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("create data dir");
        // OpenBao 2 has no `file` storage; single-node raft keeps the data on disk.
        let config = format!(
            r#"storage "raft" {{
  path = "{}"
  node_id = "test-node"
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster_port}"
"#,
            data.display()
        );
        std::fs::write(dir.path().join("config.hcl"), config).expect("write config");
        let mut bao = OpenBao {
            child: None,
            port,
            addr: format!("http://127.0.0.1:{port}"),
            root_token: String::new(),
            mode: Mode::Persistent {
                unseal_key: String::new(),
            },
            dir,
            http: reqwest::Client::new(),
        };
        bao.spawn();
        bao.wait_until_answering().await;
        let init = bao
            .raw(
                "PUT",
                "sys/init",
                Some(json!({"secret_shares": 1, "secret_threshold": 1})),
                false,
            )
            .await
            .expect("sys/init");
        bao.root_token = init["root_token"].as_str().expect("root_token").to_owned();
        bao.mode = Mode::Persistent {
            unseal_key: init["keys"][0].as_str().expect("unseal key").to_owned(),
        };
        bao.unseal().await;
        bao.enable_kv2("secret").await;
        bao
    }

    /// `http://127.0.0.1:<port>`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The root token (test-only, random per server).
    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("bao.log")
    }

    fn spawn(&mut self) {
        let bin = bao_binary();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open log");
        let mut cmd = Command::new(&bin);
        match &self.mode {
            Mode::Dev => {
                cmd.args([
                    "server",
                    "-dev",
                    &format!("-dev-listen-address=127.0.0.1:{}", self.port),
                    &format!("-dev-root-token-id={}", self.root_token),
                    "-dev-no-store-token",
                ]);
            }
            Mode::Persistent { .. } => {
                cmd.arg("server").arg(format!(
                    "-config={}",
                    self.dir.path().join("config.hcl").display()
                ));
            }
        }
        // Keep the developer's own Vault settings out of the child.
        for var in ["VAULT_ADDR", "VAULT_TOKEN", "BAO_ADDR", "BAO_TOKEN"] {
            cmd.env_remove(var);
        }
        cmd.env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); install OpenBao with `make tools` (.ci/install-tools.sh)",
                bin.display()
            )
        });
        self.child = Some(child);
    }

    /// Waits until the listener answers `sys/health` with any status (sealed counts).
    async fn wait_until_answering(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "OpenBao exited early with {status}; its log is at {}",
                    self.log_path().display()
                );
            }
            let url = format!("{}/v1/sys/health", self.addr);
            if self.http.get(&url).send().await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao did not answer on {} within 30s; its log is at {}",
                self.addr,
                self.log_path().display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same storage.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_until_answering().await;
    }

    /// Unseals a persistent server with its unseal key.
    pub async fn unseal(&self) {
        let Mode::Persistent { unseal_key } = &self.mode else {
            panic!("a dev server is unsealed at start");
        };
        let out = self
            .raw("PUT", "sys/unseal", Some(json!({"key": unseal_key})), false)
            .await
            .expect("sys/unseal");
        assert_eq!(
            out["sealed"],
            json!(false),
            "server still sealed after unseal"
        );
        // Raft elects itself leader shortly after unsealing; wait until the node is active.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let url = format!("{}/v1/sys/health", self.addr);
            if let Ok(resp) = self.http.get(&url).send().await
                && resp.status().as_u16() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao did not become active within 30s after unsealing; log at {}",
                self.log_path().display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Seals the server with `bao operator seal` (the CLI, as an operator would).
    pub fn seal_with_cli(&self) {
        let out = self.cli(&["operator", "seal"]);
        assert!(out.status.success(), "bao operator seal failed");
    }

    /// Runs the `bao` CLI against this server with the root token.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bao_binary())
            .args(args)
            .env("VAULT_ADDR", &self.addr)
            .env("VAULT_TOKEN", &self.root_token)
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run bao CLI")
    }

    /// Calls the HTTP API with the root token; returns the JSON body (`Null` when empty).
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.raw(method, path, body, true)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Calls the HTTP API with a given token (or none).
    pub async fn api_with_token(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}/v1/{path}", self.addr));
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            // Error bodies hold only error strings; never print request bodies.
            return Err(format!("HTTP {status}: {text}"));
        }
        if text.trim().is_empty() {
            Ok(Value::Null)
        } else {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        }
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        with_root: bool,
    ) -> Result<Value, String> {
        let token = with_root.then_some(self.root_token.as_str());
        self.api_with_token(token, method, path, body).await
    }

    /// Enables a KV version 2 engine at `mount`.
    pub async fn enable_kv2(&self, mount: &str) {
        self.api(
            "POST",
            &format!("sys/mounts/{mount}"),
            Some(json!({"type": "kv", "options": {"version": "2"}})),
        )
        .await;
    }

    /// Writes a policy.
    pub async fn put_policy(&self, name: &str, hcl: &str) {
        self.api(
            "PUT",
            &format!("sys/policies/acl/{name}"),
            Some(json!({"policy": hcl})),
        )
        .await;
    }

    /// Creates a token with `policies` and the given `ttl` (e.g. "1h"); returns it.
    pub async fn create_token(&self, policies: &[&str], ttl: &str) -> String {
        let out = self
            .api(
                "POST",
                "auth/token/create",
                Some(json!({
                    "policies": policies,
                    "ttl": ttl,
                    "explicit_max_ttl": "1h",
                    "renewable": true,
                    "no_default_policy": false,
                })),
            )
            .await;
        out["auth"]["client_token"].as_str().unwrap().to_owned()
    }

    /// Reads a path's KV v2 metadata (including `custom_metadata`) with the root token.
    pub async fn kv_metadata(&self, mount: &str, path: &str) -> Value {
        self.api("GET", &format!("{mount}/metadata/{path}"), None)
            .await["data"]
            .clone()
    }

    /// Directory owned by this server's test (for credential files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fake Kubernetes API that answers TokenReviews: the one accepted token authenticates as
/// `system:serviceaccount:<namespace>:<name>`, every other token is rejected.
pub struct TokenReviewer {
    pub url: String,
    pub reviews: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenReviewer {
    pub async fn start(accepted_token: String, namespace: &str, name: &str, uid: &str) -> Self {
        use axum::Json;
        use axum::routing::post;

        let reviews = Arc::new(AtomicUsize::new(0));
        let counter = reviews.clone();
        let username = format!("system:serviceaccount:{namespace}:{name}");
        let uid = uid.to_owned();
        let app = axum::Router::new().route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(move |Json(review): Json<Value>| {
                let counter = counter.clone();
                let accepted = accepted_token.clone();
                let username = username.clone();
                let uid = uid.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let token = review["spec"]["token"].as_str().unwrap_or_default();
                    let status = if token == accepted {
                        json!({
                            "authenticated": true,
                            "user": {
                                "username": username,
                                "uid": uid,
                                "groups": ["system:serviceaccounts"],
                            },
                            "audiences": review["spec"]["audiences"].clone(),
                        })
                    } else {
                        json!({"authenticated": false, "error": "invalid bearer token"})
                    };
                    Json(json!({
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview",
                        "status": status,
                    }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TokenReviewer { url, reviews, task }
    }
}

impl Drop for TokenReviewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A JWT-shaped service-account token (unsigned: the TokenReview is what vouches for it).
pub fn service_account_jwt(namespace: &str, name: &str, uid: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = chrono::Utc::now().timestamp();
    let header = json!({"alg": "RS256", "kid": "test"});
    let claims = json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "aud": ["https://kubernetes.default.svc.cluster.local"],
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": uid},
        },
    });
    let signature: Vec<u8> = (0..256).map(|_| rand::random::<u8>()).collect();
    format!(
        "{}.{}.{}",
        b64.encode(header.to_string()),
        b64.encode(claims.to_string()),
        b64.encode(signature)
    )
}
