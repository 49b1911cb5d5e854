//! The configuration file (`--config FILE`, `LOCKSTEP_CONFIG`): flat TOML whose keys are
//! the long option names of `lockstep serve` (e.g. `listen`, `max-connections`,
//! `metrics-listen`). Precedence: command-line flags > environment variables > the file >
//! defaults. The file's values are handed to the same parser as the flags (as if given on
//! the command line where neither a flag nor the environment set the option), so a value
//! is checked exactly as its flag is, and an unknown key is an error that names it.

use anyhow::{Context as _, bail};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command, CommandFactory};
use std::ffi::OsString;
use std::path::Path;

/// Largest configuration file read (a config file is a few hundred bytes).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Options that never belong in the file: they pick the file, or are not server settings.
const NOT_IN_FILE: &[&str] = &["config", "help", "version"];

/// The argument list to parse: `argv` with the config file's values added for every option
/// that the command line and the environment left unset. Without a config file: `argv`.
pub fn argv_with_config(argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let cmd = crate::cli::Cli::command();
    // A first parse finds the file and what the flags and environment set. When it fails
    // (a bad flag, --help), the real parse below reports it as clap does.
    let Ok(matches) = cmd.clone().try_get_matches_from(&argv) else {
        return Ok(argv);
    };
    let Some(file) = matches.get_one::<std::path::PathBuf>("config").cloned() else {
        return Ok(argv);
    };
    let table = read(&file)?;
    let extra = file_args(&cmd, &matches, &table, &file)?;
    let mut out = argv;
    out.extend(extra);
    Ok(out)
}

/// Reads and parses the file: TOML, a flat table of keys.
pub fn read(file: &Path) -> anyhow::Result<toml::Table> {
    let meta = std::fs::metadata(file).with_context(|| format!("cannot read the config file {}", file.display()))?;
    if !meta.is_file() {
        bail!("config file {}: not a regular file", file.display());
    }
    if meta.len() > MAX_FILE_BYTES {
        bail!("config file {}: larger than {MAX_FILE_BYTES} bytes", file.display());
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read the config file {}", file.display()))?;
    text.parse::<toml::Table>().map_err(|e| anyhow::anyhow!("config file {}: {e}", file.display()))
}

/// Every key the file may hold: the long names of `serve`'s options (global ones included).
pub fn known_keys() -> Vec<String> {
    let mut cmd = crate::cli::Cli::command();
    cmd.build();
    let serve = cmd.find_subcommand("serve").expect("serve exists");
    serve.get_arguments().filter_map(|a| a.get_long()).filter(|l| !NOT_IN_FILE.contains(l)).map(str::to_owned).collect()
}

/// The flags that carry the file's values into the parse of the command `matches` names.
fn file_args(cmd: &Command, matches: &ArgMatches, table: &toml::Table, file: &Path) -> anyhow::Result<Vec<OsString>> {
    let known = known_keys();
    for key in table.keys() {
        if !known.iter().any(|k| k == key) {
            bail!(
                "config file {}: unknown key `{key}` (keys are the long option names of `lockstep serve` without \
                 their leading `--`: {})",
                file.display(),
                known.join(", ")
            );
        }
    }
    // The command that runs (the deepest subcommand), with the global options propagated.
    let mut cmd = cmd.clone();
    cmd.build();
    let (mut sub, mut m) = (&cmd, matches);
    while let Some((name, next)) = m.subcommand() {
        sub = sub.find_subcommand(name).expect("clap matched it");
        m = next;
    }
    let mut out = Vec::new();
    for (key, value) in table {
        // A key of another command (e.g. `listen` while running `keys list`) does not apply.
        let Some(arg) = sub.get_arguments().find(|a| a.get_long() == Some(key.as_str())) else {
            continue;
        };
        let id = arg.get_id().as_str();
        if matches!(m.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => bail!(
                "config file {}: `{key}` must be a string, number or boolean, not {}",
                file.display(),
                other.type_str()
            ),
        };
        match arg.get_action() {
            ArgAction::SetTrue => match value {
                toml::Value::Boolean(true) => out.push(OsString::from(format!("--{key}"))),
                toml::Value::Boolean(false) => {}
                _ => bail!("config file {}: `{key}` must be true or false", file.display()),
            },
            _ => out.push(OsString::from(format!("--{key}={text}"))),
        }
    }
    Ok(out)
}

/// Where an option's effective value came from.
fn source_name(s: Option<ValueSource>, in_file: bool) -> &'static str {
    match s {
        Some(ValueSource::CommandLine) if in_file => "file",
        Some(ValueSource::CommandLine) => "flag",
        Some(ValueSource::EnvVariable) => "environment",
        Some(ValueSource::DefaultValue) => "default",
        _ => "unset",
    }
}

/// `lockstep config check FILE`: the settings `lockstep serve --config FILE` would run
/// with (the environment taking precedence as it would), one `key = value  # source` line
/// each, secrets redacted. Fails on what `serve` would refuse before it opens its database
/// (an unknown key, a value its flag refuses, a database URL of no supported kind).
pub fn check(file: &Path, rest: &[OsString]) -> anyhow::Result<Vec<String>> {
    let mut argv: Vec<OsString> = vec!["lockstep".into(), "serve".into(), "--config".into(), file.into()];
    argv.extend(rest.iter().cloned());
    let cmd = crate::cli::Cli::command();
    let first = cmd.clone().try_get_matches_from(&argv).map_err(|e| anyhow::anyhow!("{e}"))?;
    let table = read(file)?;
    let extra = file_args(&cmd, &first, &table, file)?;
    let from_file: Vec<String> = extra.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    argv.extend(extra);
    let matches = cmd.clone().try_get_matches_from(&argv).map_err(|e| {
        // clap's own first line, without its `error: ` and its usage advice.
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default().trim_start_matches("error: ").to_owned();
        anyhow::anyhow!("config file {}: {first}", file.display())
    })?;
    let (_, serve) = matches.subcommand().expect("serve");
    if let Some(url) = serve.get_one::<String>("database")
        && !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        bail!("config file {}: database `{}` is not a sqlite: or postgres:// URL", file.display(), redact_url(url));
    }
    let mut built = cmd;
    built.build();
    let serve_cmd = built.find_subcommand("serve").expect("serve exists");
    let mut lines = Vec::new();
    for arg in serve_cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_IN_FILE.contains(&long) {
            continue;
        }
        let id = arg.get_id().as_str();
        let in_file = from_file.iter().any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}=")));
        let raw: Vec<String> =
            serve.get_raw(id).map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect()).unwrap_or_default();
        let value = match arg.get_action() {
            ArgAction::SetTrue => serve.get_flag(id).to_string(),
            _ if raw.is_empty() => "(unset)".to_string(),
            _ => redact(long, &raw.join(",")),
        };
        let shown = if value.parse::<f64>().is_ok() || value == "true" || value == "false" || value == "(unset)" {
            value
        } else {
            format!("{value:?}")
        };
        lines.push(format!("{long} = {shown}  # {}", source_name(serve.value_source(id), in_file)));
    }
    Ok(lines)
}

/// A value as it may be printed: passwords in URLs and secret-bearing settings hidden.
pub fn redact(key: &str, value: &str) -> String {
    if key.contains("secret") || key.contains("password") {
        return "(redacted)".into();
    }
    redact_url(value)
}

/// `scheme://user:password@host/...` → `scheme://user:***@host/...`; query strings dropped
/// (they may carry credentials, e.g. `?password=`). The user info ends at the last `@`
/// (a host has none), so a password holding `/`, `?` or `@` unencoded is hidden whole.
pub fn redact_url(value: &str) -> String {
    let Some(scheme_end) = value.find("://") else { return value.to_string() };
    let (scheme, rest) = value.split_at(scheme_end + 3);
    let (userinfo, rest) = match rest.rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            let hidden = if rest[..at].contains(':') { format!("{user}:***@") } else { format!("{user}@") };
            (hidden, &rest[at + 1..])
        }
        None => (String::new(), rest),
    };
    let rest = match rest.find('?') {
        Some(q) => format!("{}?***", &rest[..q]),
        None => rest.to_string(),
    };
    format!("{scheme}{userinfo}{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords_and_queries() {
        assert_eq!(redact_url("postgres://app:s3cret@db:5432/x"), "postgres://app:***@db:5432/x");
        assert_eq!(redact_url("postgres://app@db/x?password=s3cret"), "postgres://app@db/x?***");
        assert_eq!(redact_url("sqlite://lockstep.db"), "sqlite://lockstep.db");
        assert_eq!(redact_url("127.0.0.1:9090"), "127.0.0.1:9090");
        assert_eq!(redact_url("postgres://app:pa/ss@db:5432/x"), "postgres://app:***@db:5432/x");
        assert_eq!(redact_url("postgres://app:pa?ss@db/x"), "postgres://app:***@db/x");
        assert_eq!(redact_url("postgres://app:p@ss@db/x?sslmode=require"), "postgres://app:***@db/x?***");
    }
}
