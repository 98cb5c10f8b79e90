//! The container image's recipe, checked without a Docker engine: the `Dockerfile` must build
//! the binary Cargo defines, copy it from the build stage into a distroless (or static) final
//! stage, run it as the non-root numeric user 65532, and start it in exec form, with no shell.

use std::path::Path;

fn read(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The `name` of the first `[[bin]]` table of a Cargo manifest.
fn cargo_bin_name(manifest: &str) -> Option<String> {
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
            continue;
        }
        if in_bin && let Some(rest) = line.strip_prefix("name") {
            let value = rest.trim_start().strip_prefix('=')?.trim();
            return Some(value.trim_matches('"').to_string());
        }
    }
    None
}

/// One Dockerfile instruction: keyword (upper case) and its arguments, continuations joined.
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

fn instructions(dockerfile: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
        });
        current.clear();
    }
    out
}

/// A build stage: base image, optional name, instructions.
#[derive(Debug)]
struct Stage {
    base: String,
    name: Option<String>,
    body: Vec<Instruction>,
}

fn stages(dockerfile: &str) -> Vec<Stage> {
    let mut out: Vec<Stage> = Vec::new();
    for ins in instructions(dockerfile) {
        if ins.keyword == "FROM" {
            let words: Vec<&str> = ins
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            out.push(Stage {
                base: words.first().unwrap_or(&"").to_string(),
                name,
                body: Vec::new(),
            });
        } else if let Some(stage) = out.last_mut() {
            stage.body.push(ins);
        }
    }
    out
}

/// Exec form: a JSON array of strings.
fn exec_form(args: &str) -> Option<Vec<String>> {
    serde_json::from_str::<Vec<String>>(args).ok()
}

const SHELLS: [&str; 6] = ["sh", "/bin/sh", "bash", "/bin/bash", "/busybox/sh", "-c"];

/// Everything wrong with `dockerfile` as the image of binary `bin`; empty when it is right.
fn problems(dockerfile: &str, bin: &str) -> Vec<String> {
    let mut p = Vec::new();
    let stages = stages(dockerfile);
    if stages.len() < 2 {
        return vec![format!(
            "needs a build stage and a final stage, found {} stage(s)",
            stages.len()
        )];
    }
    let final_stage = stages.last().unwrap();
    let build_stages = &stages[..stages.len() - 1];

    // The build: a release, locked build of this binary in a Rust image.
    let builds: Vec<(&Stage, &Instruction)> = build_stages
        .iter()
        .flat_map(|s| s.body.iter().map(move |i| (s, i)))
        .filter(|(_, i)| i.keyword == "RUN" && i.args.contains("cargo build"))
        .collect();
    match builds.as_slice() {
        [] => p.push("no build stage runs `cargo build`".into()),
        [(stage, run), ..] => {
            if !stage.base.starts_with("rust:") {
                p.push(format!(
                    "the build stage's base {} is not a rust image",
                    stage.base
                ));
            }
            for flag in ["--release", "--locked"] {
                if !run.args.split_whitespace().any(|w| w == flag) {
                    p.push(format!("`cargo build` lacks {flag}"));
                }
            }
            let words: Vec<&str> = run.args.split_whitespace().collect();
            if let Some(i) = words.iter().position(|w| *w == "--bin")
                && words.get(i + 1) != Some(&bin)
            {
                p.push(format!("`cargo build --bin` does not name {bin}"));
            }
        }
    }

    // The copy: the binary from a build stage into the final image.
    let build_names: Vec<&str> = build_stages
        .iter()
        .filter_map(|s| s.name.as_deref())
        .collect();
    let release_path = format!("target/release/{bin}");
    let copied = final_stage.body.iter().find_map(|i| {
        if i.keyword != "COPY" {
            return None;
        }
        let words: Vec<&str> = i.args.split_whitespace().collect();
        let from = words
            .iter()
            .find_map(|w| w.strip_prefix("--from="))
            .filter(|f| build_names.contains(f))?;
        let paths: Vec<&&str> = words.iter().filter(|w| !w.starts_with("--")).collect();
        let (src, dest) = match paths.as_slice() {
            [src, dest] => (src.to_string(), dest.to_string()),
            _ => return None,
        };
        let from_stage = build_stages
            .iter()
            .find(|s| s.name.as_deref() == Some(from))?;
        // The source is the release binary itself, or where the build stage installed it.
        let produced = src.ends_with(&release_path)
            || from_stage.body.iter().any(|r| {
                r.keyword == "RUN" && r.args.contains(&release_path) && r.args.contains(&src)
            });
        (src.rsplit('/').next() == Some(bin) && produced).then_some(dest)
    });
    let dest = match copied {
        Some(dest) => dest,
        None => {
            p.push(format!(
                "the final stage does not COPY --from=<build stage> the built {bin} binary"
            ));
            String::new()
        }
    };

    // The final image: distroless or scratch, numeric non-root user, exec form, no shell.
    if !(final_stage.base.contains("distroless") || final_stage.base == "scratch") {
        p.push(format!(
            "final base {} is neither distroless nor scratch",
            final_stage.base
        ));
    }
    match final_stage.body.iter().rev().find(|i| i.keyword == "USER") {
        None => p.push("the final stage sets no USER (it would run as root)".into()),
        Some(user) => {
            let uid = user.args.split(':').next().unwrap_or("");
            match uid.parse::<u32>() {
                Ok(65532) => {}
                Ok(other) => p.push(format!("USER {other} is not 65532")),
                Err(_) => p.push(format!(
                    "USER {} is not numeric (runAsNonRoot cannot verify a name)",
                    user.args
                )),
            }
        }
    }
    if final_stage.body.iter().any(|i| i.keyword == "SHELL") {
        p.push("the final stage sets a SHELL".into());
    }
    match final_stage
        .body
        .iter()
        .rev()
        .find(|i| i.keyword == "ENTRYPOINT")
    {
        None => p.push("no ENTRYPOINT".into()),
        Some(ep) => match exec_form(&ep.args) {
            None => p.push(format!(
                "ENTRYPOINT {} is shell form; use [\"/{bin}\"]",
                ep.args
            )),
            Some(argv) => {
                if argv.iter().any(|a| SHELLS.contains(&a.as_str())) {
                    p.push(format!("ENTRYPOINT {argv:?} goes through a shell"));
                }
                if argv.first() != Some(&dest) || dest.is_empty() {
                    p.push(format!(
                        "ENTRYPOINT {argv:?} does not start the copied binary {dest}"
                    ));
                }
            }
        },
    }
    match final_stage.body.iter().rev().find(|i| i.keyword == "CMD") {
        None => p.push("no CMD [\"run\"]".into()),
        Some(cmd) => match exec_form(&cmd.args) {
            Some(argv) if argv == ["run"] => {}
            _ => p.push(format!("CMD {} is not [\"run\"]", cmd.args)),
        },
    }
    let labels: String = final_stage
        .body
        .iter()
        .filter(|i| i.keyword == "LABEL")
        .map(|i| i.args.as_str())
        .collect();
    for label in ["title", "source", "licenses", "version", "revision"] {
        if !labels.contains(&format!("org.opencontainers.image.{label}=")) {
            p.push(format!("no org.opencontainers.image.{label} label"));
        }
    }
    p
}

fn bin() -> String {
    cargo_bin_name(&read("Cargo.toml")).expect("Cargo.toml has a [[bin]] with a name")
}

#[test]
fn cargo_toml_names_the_operator_binary() {
    assert_eq!(bin(), "stripe-key-operator");
}

#[test]
fn dockerfile_builds_copies_and_runs_the_binary_as_non_root_without_a_shell() {
    let problems = problems(&read("Dockerfile"), &bin());
    assert!(problems.is_empty(), "Dockerfile problems: {problems:#?}");
}

#[test]
fn dockerignore_keeps_build_output_git_and_tool_caches_out_of_the_context() {
    let ignore = read(".dockerignore");
    let entries: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in ["target", ".git", ".ci/cache"] {
        assert!(
            entries.contains(&needed),
            ".dockerignore lacks {needed}: {entries:?}"
        );
    }
}

/// The checks above must be able to fail: each broken variant of the real Dockerfile is caught.
#[test]
fn the_checker_refuses_broken_dockerfiles() {
    let good = read("Dockerfile");
    let bin = bin();
    let cases: [(&str, &str, &str); 8] = [
        ("USER 65532:65532", "USER nonroot:nonroot", "is not numeric"),
        ("USER 65532:65532", "USER 0", "is not 65532"),
        ("USER 65532:65532\n", "", "sets no USER"),
        (
            "ENTRYPOINT [\"/stripe-key-operator\"]",
            "ENTRYPOINT /stripe-key-operator",
            "shell form",
        ),
        (
            "ENTRYPOINT [\"/stripe-key-operator\"]",
            "ENTRYPOINT [\"/bin/sh\", \"-c\", \"/stripe-key-operator\"]",
            "goes through a shell",
        ),
        (
            "cargo build --release --locked",
            "cargo build --release",
            "lacks --locked",
        ),
        (
            "COPY --from=build /out/stripe-key-operator /stripe-key-operator",
            "COPY --from=build /out/other /stripe-key-operator",
            "does not COPY --from=<build stage>",
        ),
        (
            "FROM gcr.io/distroless/cc-debian12:nonroot",
            "FROM debian:bookworm-slim",
            "neither distroless nor scratch",
        ),
    ];
    for (from, to, expected) in cases {
        assert!(
            good.contains(from),
            "the Dockerfile no longer contains {from:?}"
        );
        let broken = good.replacen(from, to, 1);
        let found = problems(&broken, &bin);
        assert!(
            found.iter().any(|p| p.contains(expected)),
            "replacing {from:?} by {to:?} should report {expected:?}, got {found:#?}"
        );
    }
    let renamed = problems(&good, "another-binary");
    assert!(
        renamed
            .iter()
            .any(|p| p.contains("does not name another-binary")),
        "a Dockerfile building another binary is refused: {renamed:#?}"
    );
}
