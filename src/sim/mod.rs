//! The Stripe API simulator used by tests, benchmarks and the local sandbox.
//! (to be written: see issue 3)

/// Command-line arguments of `stripe-key-operator stripe-sim`.
#[derive(clap::Args, Debug)]
pub struct SimArgs {}

/// Runs the simulator until interrupted.
pub async fn run_cli(_args: SimArgs) -> anyhow::Result<()> {
    anyhow::bail!("the Stripe simulator is not written yet")
}
