//! `docs/cli.md`, generated from the command-line definitions themselves, so
//! the reference of every command, flag, environment variable and exit code
//! cannot drift from the binary. A unit test compares the file with
//! [`markdown`]; `CINFLOW_UPDATE_DOCS=1 cargo test --release --all-features
//! --lib cli::reference` rewrites it.

use std::fmt::Write;

use clap::CommandFactory;

use super::{Cli, Exit};

/// The whole reference, as Markdown.
pub fn markdown() -> String {
    let mut out = String::new();
    let root = Cli::command();
    out.push_str(
        "# Command-line reference\n\n\
         Every `cinflow` command with its flags, the environment variable each \
         flag can be set from, and defaults, generated from the binary's own \
         definitions (`src/cli/reference.rs`; a test fails when this file is \
         out of date). A flag given on the command line wins over its \
         environment variable, which wins over the default. Flags that can \
         carry a secret never print the environment's value in `--help`.\n\n\
         Flag names keep one meaning across commands: `--model` is always a \
         model bundle folder, `--model-name` the model's name in a registry, \
         `--model-alias` a registry alias (such as `current`), and \
         `--model-version` a registry version or an alias naming one.\n\n",
    );
    out.push_str("## Exit codes\n\n| code | meaning |\n| --- | --- |\n");
    for e in Exit::ALL {
        let _ = writeln!(out, "| {} | {} |", e.code(), e.meaning());
    }
    out.push_str(
        "\nWith `--log-format json` a fatal error is one JSON log line on stderr \
         (level `ERROR`, message `cinflow stopped`, fields `exit_code`, `exit` \
         and `error`); with `text` it is one `error: …` line.\n\n",
    );
    out.push_str("## Commands\n\n");
    for (path, cmd) in commands(&root, "cinflow") {
        if path != "cinflow" {
            let _ = writeln!(
                out,
                "- [`{path}`](#{}) — {}",
                path.replace(' ', "-"),
                one_line(cmd.get_about().map(|a| a.to_string()).unwrap_or_default())
            );
        }
    }
    out.push('\n');
    for (path, cmd) in commands(&root, "cinflow") {
        section(&mut out, &path, &cmd);
    }
    out
}

/// Every command and subcommand, depth first, with its full path.
fn commands(cmd: &clap::Command, path: &str) -> Vec<(String, clap::Command)> {
    let mut all = vec![(path.to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        all.extend(commands(sub, &format!("{path} {}", sub.get_name())));
    }
    all
}

fn one_line(text: String) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn section(out: &mut String, path: &str, cmd: &clap::Command) {
    let _ = writeln!(out, "## {path}\n");
    let about = cmd
        .get_long_about()
        .or(cmd.get_about())
        .map(|a| a.to_string());
    if let Some(about) = about {
        let _ = writeln!(out, "{}\n", about.trim());
    }
    let subs: Vec<&str> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .map(|s| s.get_name())
        .collect();
    if !subs.is_empty() {
        let _ = writeln!(
            out,
            "Subcommands: {}.\n",
            subs.iter()
                .map(|s| format!("[`{s}`](#{}-{s})", path.replace(' ', "-")))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let args: Vec<&clap::Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version"))
        .collect();
    if args.is_empty() {
        return;
    }
    out.push_str("| argument | environment | default | meaning |\n| --- | --- | --- | --- |\n");
    for a in args {
        let value = a
            .get_value_names()
            .map(|v| v.join(" "))
            .unwrap_or_else(|| a.get_id().as_str().to_uppercase());
        let takes_value = a.get_action().takes_values();
        let name = match (a.get_long(), a.get_short()) {
            (Some(l), _) if takes_value => format!("`--{l} <{value}>`"),
            (Some(l), _) => format!("`--{l}`"),
            (None, Some(s)) => format!("`-{s}`"),
            (None, None) => format!("`<{value}>`"),
        };
        let aliases = a
            .get_visible_aliases()
            .map(|v| {
                v.iter()
                    .map(|x| format!(" (or `--{x}`)"))
                    .collect::<String>()
            })
            .unwrap_or_default();
        let env = a
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let default = a
            .get_default_values()
            .iter()
            .map(|d| format!("`{}`", d.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut help = one_line(
            a.get_long_help()
                .or(a.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default(),
        );
        let values: Vec<String> = a
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        if !help.is_empty() && !help.ends_with(['.', ')', ':']) {
            help.push('.');
        }
        if !values.is_empty() && takes_value && a.get_long() != Some("log-format") {
            let _ = write!(help, " One of {}.", values.join(", "));
        }
        if a.is_required_set() {
            help = format!("**Required.** {help}");
        }
        let name = name.replace('|', "\\|");
        let _ = writeln!(out, "| {name}{aliases} | {env} | {default} | {help} |");
    }
    out.push('\n');
}

/// The reference describes the full build (`--all-features`): the training
/// commands are part of it.
#[cfg(all(test, feature = "train"))]
mod tests {
    #[test]
    fn docs_cli_md_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cli.md");
        let want = super::markdown();
        if std::env::var_os("CINFLOW_UPDATE_DOCS").is_some() {
            std::fs::write(path, &want).expect("write docs/cli.md");
            return;
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "docs/cli.md is out of date with the command-line definitions: run \
             CINFLOW_UPDATE_DOCS=1 cargo test --release --all-features --lib cli::reference"
        );
    }
}
