//! Per-connection session state: the settings `SET`, `SHOW` and `RESET` read and change,
//! and whether the client is inside a `BEGIN … COMMIT` block.
//!
//! [`Command::from_statement`] recognises the session statements among parsed ones;
//! [`Session`] holds one connection's settings (stored in pgwire's per-connection
//! extensions by the Postgres handler). Nothing here runs a query or touches the catalog.
//!
//! Transaction blocks are accepted so that drivers which wrap reads in `BEGIN`/`COMMIT`
//! work, but each statement still commits on its own: a write inside a block is durable
//! when it returns and `ROLLBACK` does not undo it. `BEGIN READ ONLY` refuses writes.

use std::collections::BTreeMap;
use std::time::Duration;

use datafusion::sql::parser::{ResetStatement, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{
    DiscardObject, Expr, Reset, Set, Statement as SqlStatement, TransactionAccessMode, TransactionMode, Value,
};

use crate::error::{Error, Result};
use crate::sql::Statement;

/// A setting clients may read with SHOW and (if `settable`) change with SET.
struct Parameter {
    /// The name as Postgres spells it in `SHOW ALL` and ParameterStatus messages.
    name: &'static str,
    default: &'static str,
    settable: bool,
    /// Whether a change is reported to the client (Postgres' GUC_REPORT), which drivers
    /// such as pgjdbc check.
    reported: bool,
    description: &'static str,
}

const fn param(
    name: &'static str,
    default: &'static str,
    settable: bool,
    reported: bool,
    description: &'static str,
) -> Parameter {
    Parameter { name, default, settable, reported, description }
}

/// Every setting freshet knows; any other name is refused with 42704.
const PARAMETERS: &[Parameter] = &[
    param("application_name", "", true, true, "Sets the application name to be reported in statistics and logs."),
    param("client_encoding", "UTF8", true, true, "Sets the client's character set encoding (only UTF8)."),
    param("client_min_messages", "notice", true, false, "Sets the message levels that are sent to the client."),
    param("DateStyle", "ISO, MDY", true, true, "Sets the display format for date and time values (ISO only)."),
    param("default_transaction_isolation", "read committed", false, false, "Each statement reads the latest commit."),
    param(
        "default_transaction_read_only",
        "off",
        true,
        false,
        "Sets the default read-only status of new transaction blocks.",
    ),
    param("extra_float_digits", "1", true, false, "Sets the number of digits displayed for floating-point values."),
    param("integer_datetimes", "on", false, true, "Shows whether datetimes are integer based."),
    param("IntervalStyle", "postgres", true, true, "Sets the display format for interval values."),
    param("is_superuser", "on", false, true, "Shows whether the current user is a superuser."),
    param("lc_collate", "C", false, false, "Shows the collation order locale."),
    param("lc_ctype", "C", false, false, "Shows the character classification and case conversion locale."),
    param("max_identifier_length", "63", false, false, "Shows the maximum identifier length."),
    param(
        "search_path",
        "\"$user\", public",
        true,
        false,
        "Sets the schema search order (freshet has one schema, public).",
    ),
    param("server_encoding", "UTF8", false, true, "Shows the server (database) character set encoding."),
    param("server_version", SERVER_VERSION, false, true, "Shows the Postgres version freshet speaks as."),
    param("server_version_num", "160006", false, false, "Shows the server version as an integer."),
    param("standard_conforming_strings", "on", false, true, "Backslashes in ordinary string literals are literal."),
    param("statement_timeout", "0", true, false, "Cancels reads that run longer than this (0 = no limit)."),
    param("TimeZone", "UTC", true, true, "Sets the time zone for displaying time stamps (UTC only)."),
    param("transaction_isolation", "read committed", false, false, "Each statement reads the latest commit."),
    param("transaction_read_only", "off", false, false, "Shows whether the current transaction block is read-only."),
];

/// The Postgres version freshet reports (the protocol and catalog it imitates).
pub const SERVER_VERSION: &str = "16.6";

fn parameter(name: &str) -> Result<&'static Parameter> {
    let name = match name.to_ascii_lowercase().as_str() {
        "time zone" | "time_zone" => "timezone".to_string(),
        "transaction isolation level" => "transaction_isolation".to_string(),
        "names" => "client_encoding".to_string(),
        other => other.to_string(),
    };
    PARAMETERS.iter().find(|p| p.name.eq_ignore_ascii_case(&name)).ok_or_else(|| Error::Plan {
        code: "42704",
        message: format!("unrecognized configuration parameter \"{name}\""),
        position: None,
    })
}

/// A session statement, recognised before planning.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `SET [SESSION | LOCAL] name { TO | = } value | DEFAULT`; `value: None` means DEFAULT.
    Set { name: String, value: Option<String>, local: bool },
    /// `SHOW name`, or `SHOW ALL` with `name == "all"`.
    Show { name: String },
    /// `RESET name`, or `RESET ALL` with `None`.
    Reset { name: Option<String> },
    /// `BEGIN` / `START TRANSACTION`, possibly `READ ONLY`.
    Begin { read_only: bool },
    /// `COMMIT` / `END`.
    Commit,
    /// `ROLLBACK` / `ABORT`.
    Rollback,
    /// `DISCARD ALL`: every setting back to its value at connection start.
    DiscardAll,
    /// `SET [SESSION CHARACTERISTICS AS] TRANSACTION …`: accepted; freshet has one isolation level.
    SetTransaction { read_only: Option<bool> },
    /// `SAVEPOINT`, `RELEASE SAVEPOINT` or `ROLLBACK TO SAVEPOINT` (the tag names which):
    /// accepted inside a block, where nothing is pending that they could undo.
    Savepoint { tag: &'static str },
}

impl Command {
    /// The session command `statement` is, if it is one. Errors are session statements
    /// freshet refuses (e.g. `DISCARD PLANS`).
    pub fn from_statement(statement: &Statement) -> Option<Result<Command>> {
        let inner = match statement {
            Statement::Sql(DFStatement::Statement(inner)) => inner.as_ref(),
            Statement::Sql(DFStatement::Reset(ResetStatement::Variable(name))) => {
                let name = name.to_string();
                let name = if name.eq_ignore_ascii_case("all") { None } else { Some(name) };
                return Some(Ok(Command::Reset { name }));
            }
            _ => return None,
        };
        Some(Ok(match inner {
            SqlStatement::Set(set) => return Some(set_command(set)),
            SqlStatement::ShowVariable { variable } => {
                Command::Show { name: variable.iter().map(|i| i.value.clone()).collect::<Vec<_>>().join(" ") }
            }
            SqlStatement::StartTransaction { modes, .. } => {
                Command::Begin { read_only: read_only(modes) == Some(true) }
            }
            SqlStatement::Commit { .. } => Command::Commit,
            SqlStatement::Rollback { savepoint: None, .. } => Command::Rollback,
            SqlStatement::Rollback { savepoint: Some(_), .. } => Command::Savepoint { tag: "ROLLBACK" },
            SqlStatement::Savepoint { .. } => Command::Savepoint { tag: "SAVEPOINT" },
            SqlStatement::ReleaseSavepoint { .. } => Command::Savepoint { tag: "RELEASE" },
            SqlStatement::Discard { object_type: DiscardObject::ALL } => Command::DiscardAll,
            SqlStatement::Discard { object_type } => {
                return Some(Err(Error::not_supported(format!("DISCARD {object_type}"))));
            }
            SqlStatement::Reset(reset) => Command::Reset {
                name: match &reset.reset {
                    Reset::ALL => None,
                    Reset::ConfigurationParameter(name) => Some(name.to_string()),
                },
            },
            _ => return None,
        }))
    }
}

fn read_only(modes: &[TransactionMode]) -> Option<bool> {
    modes.iter().rev().find_map(|m| match m {
        TransactionMode::AccessMode(TransactionAccessMode::ReadOnly) => Some(true),
        TransactionMode::AccessMode(TransactionAccessMode::ReadWrite) => Some(false),
        TransactionMode::IsolationLevel(_) => None,
    })
}

fn set_command(set: &Set) -> Result<Command> {
    use datafusion::sql::sqlparser::ast::ContextModifier;
    match set {
        Set::SingleAssignment { scope, variable, values, .. } => {
            let value = if values.len() == 1 && is_default(&values[0]) {
                None
            } else {
                Some(values.iter().map(expr_text).collect::<Vec<_>>().join(", "))
            };
            Ok(Command::Set { name: variable.to_string(), value, local: matches!(scope, Some(ContextModifier::Local)) })
        }
        Set::SetTimeZone { local, value } => Ok(Command::Set {
            name: "TimeZone".into(),
            value: if is_default(value) { None } else { Some(expr_text(value)) },
            local: *local,
        }),
        Set::SetNames { charset_name, .. } => {
            Ok(Command::Set { name: "client_encoding".into(), value: Some(charset_name.value.clone()), local: false })
        }
        Set::SetTransaction { modes, snapshot: None, .. } => {
            Ok(Command::SetTransaction { read_only: read_only(modes) })
        }
        other => Err(Error::not_supported(format!("{other}"))),
    }
}

fn is_default(expr: &Expr) -> bool {
    matches!(expr, Expr::Identifier(ident) if ident.quote_style.is_none() && ident.value.eq_ignore_ascii_case("default"))
}

/// A SET value as text: string literals without their quotes, anything else as written.
fn expr_text(expr: &Expr) -> String {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
            other => other.to_string(),
        },
        Expr::Identifier(ident) => ident.value.clone(),
        other => other.to_string(),
    }
}

/// One connection's settings and transaction-block state.
#[derive(Debug, Clone)]
pub struct Session {
    values: BTreeMap<&'static str, String>,
    /// The values at connection start (defaults overlaid with the startup packet), which
    /// RESET and DISCARD ALL go back to.
    initial: BTreeMap<&'static str, String>,
    in_block: bool,
    block_read_only: bool,
    /// Values to restore when the block ends, for `SET LOCAL`.
    restore_at_end: Vec<(&'static str, String)>,
}

/// What a session command asks the connection to send back.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// A command tag, plus settings whose new value the client must be told.
    Done { tag: &'static str, changed: Vec<(&'static str, String)> },
    /// `BEGIN` (the connection reports "in transaction" from now on).
    BlockStarted,
    /// `COMMIT` or `ROLLBACK` (back to "idle").
    BlockEnded { tag: &'static str },
    /// Rows of `(name, setting, description)`; SHOW of one setting has only its value.
    Rows { column: String, rows: Vec<Vec<String>> },
}

impl Session {
    /// A session for a client whose startup packet carried `startup` parameters.
    /// Startup values freshet cannot honour are ignored (they keep the default).
    pub fn new<'a>(startup: impl IntoIterator<Item = (&'a String, &'a String)>) -> Session {
        let mut values: BTreeMap<&'static str, String> =
            PARAMETERS.iter().map(|p| (p.name, p.default.to_string())).collect();
        for (key, value) in startup {
            if let Ok(p) = parameter(key)
                && p.settable
                && let Ok(value) = normalize(p, value)
            {
                values.insert(p.name, value);
            }
        }
        Session { initial: values.clone(), values, in_block: false, block_read_only: false, restore_at_end: Vec::new() }
    }

    /// `statement_timeout`, if one is set.
    pub fn statement_timeout(&self) -> Option<Duration> {
        let ms = self.values.get("statement_timeout").and_then(|v| parse_duration_ms(v).ok()).unwrap_or(0);
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// Whether writes are refused: inside `BEGIN READ ONLY`.
    pub fn read_only(&self) -> bool {
        self.in_block && self.block_read_only
    }

    /// Whether a `BEGIN` block is open.
    pub fn in_block(&self) -> bool {
        self.in_block
    }

    /// The current value of a setting, by any spelling of its name.
    pub fn get(&self, name: &str) -> Result<String> {
        let p = parameter(name)?;
        Ok(self.values.get(p.name).cloned().unwrap_or_default())
    }

    /// Settings the pgwire formatter reads from the connection metadata, under the keys it
    /// looks for, so SET changes how values are sent.
    pub fn format_metadata(&self) -> Vec<(&'static str, String)> {
        [("datestyle", "DateStyle"), ("intervalstyle", "IntervalStyle"), ("extra_float_digits", "extra_float_digits")]
            .into_iter()
            .map(|(key, name)| (key, self.values.get(name).cloned().unwrap_or_default()))
            .collect()
    }

    /// Runs one session command.
    pub fn apply(&mut self, command: &Command) -> Result<Reply> {
        match command {
            Command::Set { name, value, local } => {
                let p = parameter(name)?;
                if !p.settable {
                    return Err(Error::Plan {
                        code: "55P02",
                        message: format!("parameter \"{}\" cannot be changed", p.name),
                        position: None,
                    });
                }
                let value = match value {
                    Some(v) => normalize(p, v)?,
                    None => p.default.to_string(),
                };
                if *local {
                    if !self.in_block {
                        // Postgres warns and ignores SET LOCAL outside a transaction block.
                        return Ok(Reply::Done { tag: "SET", changed: Vec::new() });
                    }
                    let old = self.values.get(p.name).cloned().unwrap_or_default();
                    self.restore_at_end.push((p.name, old));
                }
                Ok(Reply::Done { tag: "SET", changed: self.assign(p, value) })
            }
            Command::Reset { name: Some(name) } => {
                let p = parameter(name)?;
                let value = self.initial.get(p.name).cloned().unwrap_or_default();
                Ok(Reply::Done { tag: "RESET", changed: self.assign(p, value) })
            }
            Command::Reset { name: None } => Ok(Reply::Done { tag: "RESET", changed: self.reset_all() }),
            Command::DiscardAll => {
                if self.in_block {
                    return Err(Error::Plan {
                        code: "25001",
                        message: "DISCARD ALL cannot run inside a transaction block".into(),
                        position: None,
                    });
                }
                Ok(Reply::Done { tag: "DISCARD ALL", changed: self.reset_all() })
            }
            Command::Show { name } if name.eq_ignore_ascii_case("all") => Ok(Reply::Rows {
                column: String::new(),
                rows: PARAMETERS
                    .iter()
                    .map(|p| {
                        let value = self.values.get(p.name).cloned().unwrap_or_default();
                        vec![p.name.to_string(), value, p.description.to_string()]
                    })
                    .collect(),
            }),
            Command::Show { name } => {
                let p = parameter(name)?;
                let value = match p.name {
                    "transaction_read_only" => if self.read_only() { "on" } else { "off" }.to_string(),
                    _ => self.values.get(p.name).cloned().unwrap_or_default(),
                };
                Ok(Reply::Rows { column: p.name.to_ascii_lowercase(), rows: vec![vec![value]] })
            }
            Command::Begin { read_only } => {
                // Postgres only warns about BEGIN inside a block; the block goes on.
                if !self.in_block {
                    self.in_block = true;
                    let default_read_only = self.values.get("default_transaction_read_only").is_some_and(|v| v == "on");
                    self.block_read_only = *read_only || default_read_only;
                }
                Ok(Reply::BlockStarted)
            }
            Command::Commit | Command::Rollback => {
                self.in_block = false;
                self.block_read_only = false;
                for (name, value) in std::mem::take(&mut self.restore_at_end).into_iter().rev() {
                    self.values.insert(name, value);
                }
                Ok(Reply::BlockEnded { tag: if *command == Command::Commit { "COMMIT" } else { "ROLLBACK" } })
            }
            Command::Savepoint { tag } => {
                if !self.in_block {
                    return Err(Error::Plan {
                        code: "25P01",
                        message: format!("{tag} can only be used in transaction blocks"),
                        position: None,
                    });
                }
                Ok(Reply::Done { tag, changed: Vec::new() })
            }
            Command::SetTransaction { read_only } => {
                if let Some(read_only) = read_only
                    && self.in_block
                {
                    self.block_read_only = *read_only;
                }
                Ok(Reply::Done { tag: "SET", changed: Vec::new() })
            }
        }
    }

    /// Sets `p` and returns it as a change to report, if clients are told about it.
    fn assign(&mut self, p: &'static Parameter, value: String) -> Vec<(&'static str, String)> {
        self.values.insert(p.name, value.clone());
        if p.reported { vec![(p.name, value)] } else { Vec::new() }
    }

    fn reset_all(&mut self) -> Vec<(&'static str, String)> {
        let mut changed = Vec::new();
        for p in PARAMETERS.iter().filter(|p| p.settable) {
            let value = self.initial.get(p.name).cloned().unwrap_or_default();
            if self.values.get(p.name) != Some(&value) {
                changed.extend(self.assign(p, value));
            }
        }
        changed
    }
}

/// Checks a new value for `p` and returns it the way SHOW will print it.
fn normalize(p: &Parameter, value: &str) -> Result<String> {
    let invalid = |why: &str| Error::InvalidValue {
        code: "22023",
        message: format!("invalid value for parameter \"{}\": \"{value}\"; {why}", p.name),
    };
    let trimmed = value.trim();
    match p.name {
        "client_encoding" => match trimmed.to_ascii_uppercase().replace('-', "").as_str() {
            "UTF8" | "UNICODE" => Ok("UTF8".into()),
            _ => Err(invalid("freshet speaks UTF8 only")),
        },
        "DateStyle" => {
            let upper = trimmed.to_ascii_uppercase();
            let parts: Vec<&str> = upper.split(',').map(str::trim).collect();
            let order = parts.iter().find(|p| matches!(**p, "MDY" | "DMY" | "YMD" | "US" | "EURO" | "EUROPEAN"));
            if parts.iter().any(|p| matches!(*p, "SQL" | "POSTGRES" | "GERMAN")) {
                return Err(invalid("freshet writes dates in ISO style only"));
            }
            let order = match order.copied() {
                Some("DMY" | "EURO" | "EUROPEAN") => "DMY",
                Some("YMD") => "YMD",
                _ => "MDY",
            };
            Ok(format!("ISO, {order}"))
        }
        "IntervalStyle" => match trimmed.to_ascii_lowercase().as_str() {
            s @ ("postgres" | "postgres_verbose" | "sql_standard" | "iso_8601") => Ok(s.to_string()),
            _ => Err(invalid("use postgres, postgres_verbose, sql_standard or iso_8601")),
        },
        "extra_float_digits" => match trimmed.parse::<i32>() {
            Ok(n) if (-15..=3).contains(&n) => Ok(n.to_string()),
            _ => Err(invalid("an integer from -15 to 3 is expected")),
        },
        "statement_timeout" => parse_duration_ms(trimmed).map(show_duration_ms).map_err(|why| invalid(&why)),
        "TimeZone" => match trimmed.to_ascii_uppercase().as_str() {
            "UTC" | "ETC/UTC" | "GMT" | "ETC/GMT" | "Z" | "ZULU" | "UCT" | "UNIVERSAL" | "0" | "+00:00" | "+00"
            | "UTC0" | "GMT0" => Ok("UTC".into()),
            _ => Err(Error::NotSupported {
                feature: format!("time zone \"{trimmed}\""),
                hint: Some("freshet reads and writes TIMESTAMPTZ in UTC; use SET TIME ZONE 'UTC'".into()),
            }),
        },
        "search_path" => {
            let schemas: Vec<String> =
                trimmed.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            Ok(schemas.join(", "))
        }
        "client_min_messages" => match trimmed.to_ascii_lowercase().as_str() {
            s @ ("debug5" | "debug4" | "debug3" | "debug2" | "debug1" | "debug" | "log" | "notice" | "warning"
            | "error") => Ok(s.to_string()),
            _ => Err(invalid("use debug, log, notice, warning or error")),
        },
        "default_transaction_read_only" => match trimmed.to_ascii_lowercase().as_str() {
            "on" | "true" | "yes" | "1" => Ok("on".into()),
            "off" | "false" | "no" | "0" => Ok("off".into()),
            _ => Err(invalid("a boolean is expected")),
        },
        _ => Ok(value.to_string()),
    }
}

/// Milliseconds from a Postgres time setting: a bare number of milliseconds, or a number
/// with one of the units ms, s, min, h, d.
fn parse_duration_ms(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| "a duration such as 5000, '5s' or '1min' is expected".to_string())?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "ms" => 1.0,
        "s" => 1_000.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return Err("valid units are ms, s, min, h and d".into()),
    };
    let ms = number * scale;
    if !(0.0..=i32::MAX as f64).contains(&ms) {
        return Err("the duration is out of range".into());
    }
    Ok(ms.round() as u64)
}

/// How Postgres shows a time setting: the largest unit that divides it.
fn show_duration_ms(ms: u64) -> String {
    match ms {
        0 => "0".into(),
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}min", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(sql: &str) -> Command {
        let statement = crate::sql::parse(sql).expect("parses").pop_front().expect("one statement");
        Command::from_statement(&statement).expect("a session command").expect("accepted")
    }

    #[test]
    fn recognises_session_statements() {
        assert_eq!(
            command("SET search_path TO public, other"),
            Command::Set { name: "search_path".into(), value: Some("public, other".into()), local: false }
        );
        assert_eq!(
            command("set time zone 'UTC'"),
            Command::Set { name: "TimeZone".into(), value: Some("UTC".into()), local: false }
        );
        assert_eq!(
            command("SHOW transaction isolation level"),
            Command::Show { name: "transaction isolation level".into() }
        );
        assert_eq!(command("RESET ALL"), Command::Reset { name: None });
        assert_eq!(command("RESET statement_timeout"), Command::Reset { name: Some("statement_timeout".into()) });
        assert_eq!(command("BEGIN READ ONLY"), Command::Begin { read_only: true });
        assert_eq!(command("START TRANSACTION"), Command::Begin { read_only: false });
        assert_eq!(command("DISCARD ALL"), Command::DiscardAll);
        let select = crate::sql::parse("SELECT 1").expect("parses").pop_front().expect("one");
        assert!(Command::from_statement(&select).is_none());
    }

    #[test]
    fn settings_change_show_and_reset() {
        let startup = [("application_name".to_string(), "psql".to_string())];
        let mut session = Session::new(startup.iter().map(|(k, v)| (k, v)));
        assert_eq!(session.get("APPLICATION_NAME").expect("known"), "psql");
        session.apply(&command("SET statement_timeout = '1.5s'")).expect("valid");
        assert_eq!(session.get("statement_timeout").expect("known"), "1500ms");
        assert_eq!(session.statement_timeout(), Some(Duration::from_millis(1500)));
        session.apply(&command("SET statement_timeout TO 120000")).expect("valid");
        assert_eq!(session.get("statement_timeout").expect("known"), "2min");
        let reply = session.apply(&command("SET application_name = 'app'")).expect("valid");
        assert_eq!(reply, Reply::Done { tag: "SET", changed: vec![("application_name", "app".into())] });
        session.apply(&command("RESET ALL")).expect("valid");
        assert_eq!(session.get("application_name").expect("known"), "psql");
        assert_eq!(session.statement_timeout(), None);
        let unknown = session.apply(&command("SET no_such_thing = 1")).expect_err("unknown");
        assert_eq!(unknown.sqlstate(), "42704");
        assert_eq!(session.apply(&command("SHOW nope")).expect_err("unknown").sqlstate(), "42704");
        let fixed = session.apply(&command("SET server_version = '9'")).expect_err("read-only");
        assert_eq!(fixed.sqlstate(), "55P02");
        let bad = session.apply(&command("SET extra_float_digits = 7")).expect_err("out of range");
        assert_eq!(bad.sqlstate(), "22023");
        assert_eq!(session.apply(&command("SET TIME ZONE 'Europe/Paris'")).expect_err("not UTC").sqlstate(), "0A000");
    }

    #[test]
    fn set_local_lasts_until_the_block_ends() {
        let mut session = Session::new(std::iter::empty());
        session.apply(&command("BEGIN READ ONLY")).expect("begin");
        assert!(session.read_only());
        session.apply(&command("SET LOCAL statement_timeout = 100")).expect("set local");
        assert_eq!(session.statement_timeout(), Some(Duration::from_millis(100)));
        session.apply(&command("COMMIT")).expect("commit");
        assert_eq!(session.statement_timeout(), None);
        assert!(!session.read_only());
        let outside = session.apply(&command("SAVEPOINT sp")).expect_err("outside a block");
        assert_eq!(outside.sqlstate(), "25P01");
        session.apply(&command("BEGIN")).expect("begin");
        session.apply(&command("SAVEPOINT sp")).expect("savepoint");
        session.apply(&command("ROLLBACK TO SAVEPOINT sp")).expect("rollback to");
        session.apply(&command("RELEASE SAVEPOINT sp")).expect("release");
    }
}
