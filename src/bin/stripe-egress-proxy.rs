//! `stripe-egress-proxy`: the egress key broker on its own, the same sidecar as
//! `stripe-key-operator egress-proxy` with the same flags, in a binary that holds only the
//! broker's code. A sidecar's RSS is mostly the pages of its binary that it touches (the kernel
//! maps code in 64 KiB runs around each page used), so the operator's controllers, simulator and
//! sandbox linked around the broker's code cost memory in every pod; see the README's "Sidecar
//! memory".

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "stripe-egress-proxy",
    version,
    about = "The egress key broker: a sidecar on loopback that holds the real Stripe key, swaps \
             the application's placeholder for it, refuses routes the key's permissions cannot \
             serve and counts usage per permission (`/usage`)"
)]
struct Cli {
    #[command(flatten)]
    args: stripe_key_operator::egress::proxy::EgressProxyArgs,
}

fn main() -> std::process::ExitCode {
    stripe_key_operator::egress::proxy::main(Cli::parse().args)
}
