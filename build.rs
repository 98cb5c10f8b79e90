//! Link settings of the `stripe-key-operator` binary (the library and the tests are unaffected).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.ends_with("-linux-gnu") {
        // Packed relative relocations (DT_RELR; binutils >= 2.38, glibc >= 2.36, as in the
        // Dockerfile's bookworm build and distroless debian12 runtime). The binary stays
        // position-independent (ASLR), but the dynamic loader reads a few KiB of relocations at
        // start instead of `.rela.dyn`'s 2.2 MiB, which stayed resident for the life of the
        // process. An older GNU ld ignores the option with a warning.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
