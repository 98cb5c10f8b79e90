//! Shared harness: a server and a real kube client connected to it.
#![allow(dead_code)]

use std::time::Duration;

use kube_test_api::{ServerConfig, TestApiServer};

pub async fn setup() -> (TestApiServer, kube::Client) {
    setup_with(ServerConfig::default()).await
}

pub async fn setup_with(config: ServerConfig) -> (TestApiServer, kube::Client) {
    let server = TestApiServer::start_with(config)
        .await
        .expect("server starts");
    let config = kube::Config::new(server.url().parse().expect("url parses"));
    let client = kube::Client::try_from(config).expect("client builds");
    (server, client)
}

/// Polls `f` every 20 ms until it returns Some, failing the test after `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Status of a failed kube call.
pub fn status(err: kube::Error) -> kube::core::Status {
    match err {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}
