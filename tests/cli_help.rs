//! `--help` is read in terminals and CI logs: it never shows a secret that
//! the environment holds (the broker URL's password), while still naming the
//! variable that sets it.

mod common;

use std::process::Command;

use clap::CommandFactory;

/// Every subcommand path (`[]`, `["worker"]`, `["worker", "infer"]`, ...).
fn paths(c: &clap::Command, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(prefix.clone());
    for s in c.get_subcommands() {
        if s.get_name() == "help" {
            continue;
        }
        let mut p = prefix.clone();
        p.push(s.get_name().to_string());
        paths(s, p, out);
    }
}

fn cli() -> clap::Command {
    let mut c = cinflow::cli::Cli::command();
    c.build();
    c
}

#[test]
fn no_help_shows_a_secret_from_the_environment() {
    let secret = "pa55-from-the-environment";
    let mut all = Vec::new();
    paths(&cli(), Vec::new(), &mut all);
    assert!(all.len() > 10, "{all:?}");
    for p in &all {
        let (code, text) = common::output_all(
            Command::new(env!("CARGO_BIN_EXE_cinflow"))
                .args(p)
                .arg("--help")
                .env(
                    "CINFLOW_AMQP_URL",
                    format!("amqp://lab:{secret}@broker.example:5672/%2f"),
                )
                .env("AWS_SECRET_ACCESS_KEY", secret),
        );
        assert_eq!(code, Some(0), "cinflow {p:?} --help: {text}");
        assert!(
            !text.contains(secret),
            "cinflow {} --help shows the secret:\n{text}",
            p.join(" ")
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_cinflow"))
        .args(["worker", "infer", "--help"])
        .env("CINFLOW_AMQP_URL", format!("amqp://lab:{secret}@b/%2f"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CINFLOW_AMQP_URL"), "{text}");
}

#[test]
fn every_flag_that_can_carry_a_secret_hides_its_environment_value() {
    fn walk(c: &clap::Command, bad: &mut Vec<String>) {
        for a in c.get_arguments() {
            let Some(env) = a.get_env() else { continue };
            let env = env.to_string_lossy().to_uppercase();
            let secret = ["URL", "KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL"]
                .iter()
                .any(|w| env.contains(w));
            if secret && !a.is_hide_env_values_set() {
                bad.push(format!("{} {env}", c.get_name()));
            }
        }
        for s in c.get_subcommands() {
            walk(s, bad);
        }
    }
    let mut bad = Vec::new();
    walk(&cli(), &mut bad);
    assert!(bad.is_empty(), "flags showing their env value: {bad:?}");
}
