//! Runs a test API server until Ctrl-C, for poking at it with kubectl:
//!
//! ```text
//! cargo run -p kube-test-api --example serve -- /tmp/kubeconfig
//! kubectl --kubeconfig /tmp/kubeconfig get namespaces
//! ```
//!
//! The kubeconfig is written to the path given as the first argument (default `kubeconfig`).

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "kubeconfig".to_string());
    let server = kube_test_api::TestApiServer::start().await?;
    std::fs::write(&path, server.kubeconfig_yaml())?;
    println!(
        "kube-test-api serving on {}; kubeconfig written to {path}; Ctrl-C stops",
        server.url()
    );
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    Ok(())
}
