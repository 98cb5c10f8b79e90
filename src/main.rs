//! The `stripe-key-operator` binary: wiring only.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "stripe-key-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator (in a cluster, or against KUBECONFIG).
    Run(Box<stripe_key_operator::controller::RunConfig>),
    /// Print every CustomResourceDefinition as multi-document YAML.
    Crdgen,
    /// The operator's whole job on this machine: the Kubernetes API for tests, the Stripe
    /// simulator, an in-memory store and the controllers; applies examples/ and prints a timeline.
    Sandbox(stripe_key_operator::sandbox::SandboxArgs),
    /// Ask the operator for a rotation (`rotate stripekeypolicy/NAME -n NS [--incident]`).
    Rotate(stripe_key_operator::rotate_cli::RotateArgs),
    /// Run the local Stripe API simulator.
    StripeSim(stripe_key_operator::sim::SimArgs),
    /// Audit log tools (`audit verify FILE`).
    Audit(stripe_key_operator::audit::AuditArgs),
    /// Scan files, directories or standard input (`-`) for literal Stripe secrets.
    ///
    /// Prints `file:line:col: <kind> <masked>` per finding (never the secret). Exit status:
    /// 0 nothing found, 1 findings, 2 a path could not be read.
    Scan(stripe_key_operator::scan::ScanArgs),
    /// Permission tools (`permissions suggest REPORT... [--policy FILE]`: the least permission
    /// set from the egress proxy's usage reports).
    Permissions(stripe_key_operator::egress::suggest::PermissionsArgs),
    /// Run the webhook verifying proxy: a sidecar that forwards only requests Stripe signed.
    VerifyProxy(Box<stripe_key_operator::webhook::proxy::VerifyProxyArgs>),
    /// Run the egress key broker: a sidecar on loopback that holds the real Stripe key, swaps
    /// the application's placeholder for it, refuses routes the key's permissions cannot serve
    /// and counts usage per permission (`/usage`).
    EgressProxy(Box<stripe_key_operator::egress::proxy::EgressProxyArgs>),
}

/// With `--features heap-profile`, every allocation goes through dhat's profiler, which writes
/// `dhat-heap.json` (view it at <https://nnethercote.github.io/dh_view/dh_view.html>) when the
/// process exits normally (SIGTERM or Ctrl-C). See the README, "Where the memory goes".
#[cfg(feature = "heap-profile")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Async worker threads unless `TOKIO_WORKER_THREADS` says otherwise: the operator waits on
/// the network, and each worker thread costs a stack and its own malloc arena, so a pod on a
/// 64-core node must not start 64 of them.
const DEFAULT_WORKER_THREADS: usize = 2;

/// `stripe-key-operator egress-proxy ...` on its own: the sidecar parses only its own flags
/// (building the whole command tree touches the code of every subcommand, which a sidecar
/// would then carry in its RSS) and runs on its own single-threaded runtime
/// (`egress::proxy::main`, chosen before any runtime is built).
#[derive(Parser, Debug)]
#[command(
    name = "stripe-key-operator egress-proxy",
    version,
    about = "Run the egress key broker: a sidecar on loopback that holds the real Stripe key"
)]
struct EgressProxyCli {
    #[command(flatten)]
    args: stripe_key_operator::egress::proxy::EgressProxyArgs,
}

fn main() -> std::process::ExitCode {
    #[cfg(feature = "heap-profile")]
    // Deep enough stacks to tell whose hash table or buffer an allocation is (dhat keeps 12
    // frames by default: mostly the allocator's and the collection's own).
    let _profiler = dhat::Profiler::builder().trim_backtraces(Some(40)).build();
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "egress-proxy")
    {
        let cli = EgressProxyCli::parse_from(
            std::iter::once(std::ffi::OsString::from("stripe-key-operator egress-proxy"))
                .chain(std::env::args_os().skip(2)),
        );
        return stripe_key_operator::egress::proxy::main(cli.args);
    }
    let cli = Cli::parse();
    // Commands with their own exit statuses and runtimes.
    match cli.command {
        Command::Audit(ref args) => return stripe_key_operator::audit::run_cli(args),
        Command::Scan(ref args) => return stripe_key_operator::scan::run_cli(args),
        Command::EgressProxy(args) => return stripe_key_operator::egress::proxy::main(*args),
        _ => {}
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        runtime.worker_threads(DEFAULT_WORKER_THREADS);
    }
    match runtime.build() {
        Ok(rt) => match rt.block_on(dispatch(cli)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(config) => Ok(stripe_key_operator::controller::run(*config).await?),
        Command::Crdgen => {
            print!("{}", stripe_key_operator::api::crds_yaml()?);
            Ok(())
        }
        Command::StripeSim(args) => stripe_key_operator::sim::run_cli(args).await,
        Command::Sandbox(args) => stripe_key_operator::sandbox::run(args).await,
        Command::Rotate(args) => stripe_key_operator::rotate_cli::run(args).await,
        Command::VerifyProxy(args) => stripe_key_operator::webhook::proxy::run_cli(*args).await,
        Command::Permissions(args) => stripe_key_operator::egress::suggest::run_cli(args).await,
        Command::Audit(_) | Command::Scan(_) | Command::EgressProxy(_) => {
            unreachable!("handled in main")
        }
    }
}
