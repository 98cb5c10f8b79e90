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
    /// Print every CustomResourceDefinition as multi-document YAML.
    Crdgen,
    /// Run the local Stripe API simulator.
    StripeSim(stripe_key_operator::sim::SimArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen => {
            print!("{}", stripe_key_operator::api::crds_yaml()?);
            Ok(())
        }
        Command::StripeSim(args) => stripe_key_operator::sim::run_cli(args).await,
    }
}
