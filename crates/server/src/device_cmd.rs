//! `widgetry device add|rotate|remove|list`: the MQTT accounts of devices
//! and observers. A password is generated (or read from stdin), printed
//! once on stdout and kept only as an argon2id hash; what to do next goes
//! to stderr, so `PW=$(widgetry device add kiosk-1)` captures the password
//! alone. Works while `serve` runs on the same database: it picks changes
//! up within a second.

use std::io::{BufRead, Write};

use crate::broker::accounts::{generate_password, hash_password};
use crate::broker::policy::SERVER_USER;
use crate::config::Database;
use crate::config::cli::DeviceAction;
use crate::store::accounts::AccountKind;
use crate::store::{Store, StoreError};

/// Shortest password accepted from stdin.
pub const MIN_PASSWORD_LEN: usize = 12;
/// Longest password line read from stdin.
const MAX_PASSWORD_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "an account named {0:?} exists already: `widgetry device rotate {0}` gives it a new password"
    )]
    Exists(String),
    #[error("no account named {0:?}: `widgetry device list` shows the accounts")]
    Missing(String),
    #[error("password from stdin: {0}")]
    Password(String),
}

/// Why `name` cannot be an account's name, if it cannot.
pub fn check_account_name(name: &str) -> Result<(), String> {
    if widgetry_proto::validate::validate_device(name).is_err() {
        return Err(format!(
            "{:?} is not a device id: use 1-{} of A-Z a-z 0-9 _ . -",
            widgetry_common::excerpt(name),
            widgetry_proto::validate::MAX_DEVICE_LEN
        ));
    }
    if name == SERVER_USER || name.starts_with("widgetry-") {
        return Err(format!(
            "{name:?}: names starting with `widgetry-` are reserved for the server and its agents' client ids"
        ));
    }
    Ok(())
}

/// The password to set: read from `stdin` (first line) or generated.
fn password(from_stdin: bool, stdin: &mut dyn BufRead) -> Result<(String, bool), DeviceError> {
    if !from_stdin {
        return Ok((generate_password(), true));
    }
    let mut line = Vec::new();
    std::io::Read::take(stdin, MAX_PASSWORD_LEN as u64 + 2)
        .read_until(b'\n', &mut line)
        .map_err(|e| DeviceError::Password(e.to_string()))?;
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    let pw = String::from_utf8(line).map_err(|_| DeviceError::Password("not UTF-8".into()))?;
    if pw.len() > MAX_PASSWORD_LEN {
        return Err(DeviceError::Password(format!(
            "longer than {MAX_PASSWORD_LEN} bytes"
        )));
    }
    if pw.chars().count() < MIN_PASSWORD_LEN {
        return Err(DeviceError::Password(format!(
            "shorter than {MIN_PASSWORD_LEN} characters (leave out --password-stdin to get a generated one)"
        )));
    }
    Ok((pw, false))
}

/// Runs one `widgetry device` action; `out` gets what a script reads
/// (a password, the list), `err` what a person reads.
pub async fn run(
    action: DeviceAction,
    db: &Database,
    stdin: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), DeviceError> {
    let store = Store::open(db).await?;
    let result = act(action, &store, stdin, out, err).await;
    store.close().await;
    result
}

async fn act(
    action: DeviceAction,
    store: &Store,
    stdin: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), DeviceError> {
    // Writes to a closed stdout or stderr are not worth failing for once
    // the database has the change.
    match action {
        DeviceAction::Add {
            id,
            observer,
            password_stdin,
        } => {
            let (pw, generated) = password(password_stdin, stdin)?;
            let kind = if observer {
                AccountKind::Observer
            } else {
                AccountKind::Device
            };
            let phc = hash(pw.clone()).await;
            if !store.add_account(&id, kind, &phc).await? {
                return Err(DeviceError::Exists(id));
            }
            if generated {
                let _ = writeln!(out, "{pw}");
            }
            let _ = writeln!(err, "{} {id:?} added.", kind.as_str());
            if kind == AccountKind::Device {
                let _ = writeln!(
                    err,
                    "Start its agent with the password{}:\n  WIDGETRY_MQTT_USERNAME={id} WIDGETRY_MQTT_PASSWORD='<password>' widgetry-agent --device {id} --broker HOST:1883\n(or put both variables in the agent's environment file; see README \"Put the agent on a device\")",
                    if generated {
                        " printed above (shown only now)"
                    } else {
                        " you gave"
                    }
                );
            } else {
                let _ = writeln!(
                    err,
                    "Subscribe with it, e.g. mosquitto_sub -h HOST -u {id} -P '<password>' -t 'widgetry/v1/#' -v"
                );
            }
        }
        DeviceAction::Rotate { id, password_stdin } => {
            let (pw, generated) = password(password_stdin, stdin)?;
            let phc = hash(pw.clone()).await;
            if !store.set_account_hash(&id, &phc).await? {
                return Err(DeviceError::Missing(id));
            }
            if generated {
                let _ = writeln!(out, "{pw}");
            }
            let _ = writeln!(
                err,
                "{id:?} has a new password; the old one is refused from the next login on (a running serve notices within a second). Give the new one to the device and restart its agent."
            );
        }
        DeviceAction::Remove { id } => {
            if !store.remove_account(&id).await? {
                return Err(DeviceError::Missing(id));
            }
            let _ = writeln!(err, "{id:?} removed: it cannot log in again.");
        }
        DeviceAction::List => {
            let accounts = store.accounts().await?;
            let _ = writeln!(
                out,
                "{:<40} {:<9} {:<24} password changed",
                "name", "kind", "created"
            );
            for a in &accounts {
                let _ = writeln!(
                    out,
                    "{:<40} {:<9} {:<24} {}",
                    a.name,
                    a.kind.as_str(),
                    widgetry_common::utc_string(a.created_ms),
                    widgetry_common::utc_string(a.updated_ms)
                );
            }
            let _ = writeln!(err, "{} account(s)", accounts.len());
        }
    }
    Ok(())
}

/// Hashes off the async runtime (argon2id takes a while by design).
async fn hash(password: String) -> String {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .expect("hashing does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_stdin(input: &[u8]) -> Result<(String, bool), String> {
        password(true, &mut &input[..]).map_err(|e| e.to_string())
    }

    #[test]
    fn a_password_from_stdin_is_one_bounded_line() {
        assert_eq!(
            from_stdin(b"correct-horse-battery\r\nrest"),
            Ok(("correct-horse-battery".into(), false))
        );
        let long = vec![b'x'; 10 * MAX_PASSWORD_LEN];
        assert!(from_stdin(&long).is_err_and(|e| e.contains("longer than 1024")));
        assert!(from_stdin(b"short\n").is_err_and(|e| e.contains("shorter than 12")));
        assert!(from_stdin(b"\xff\xfe-not-utf8-at-all\n").is_err_and(|e| e.contains("UTF-8")));
        assert!(from_stdin(b"").is_err());
        let (generated, was_generated) = password(false, &mut &b""[..]).expect("generated");
        assert!(was_generated && generated.len() == 32);
    }

    #[test]
    fn account_names_are_device_ids_and_not_the_servers() {
        assert!(check_account_name("kiosk-1").is_ok());
        for bad in [
            "",
            "a/b",
            "widgetry-server",
            "widgetry-agent-x",
            &"x".repeat(65),
        ] {
            assert!(check_account_name(bad).is_err(), "{bad:?}");
        }
    }
}
