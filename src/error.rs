//! The one error type of freshet, and how each cause maps to a Postgres SQLSTATE.
//!
//! Variants are grouped by cause, not by the module that raised them, so the server can
//! answer every failure with the code a Postgres client expects. Planning and execution
//! errors from DataFusion are classified once, in [`Error::from_datafusion`]; nothing else
//! in freshet inspects DataFusion's error text.

use datafusion::error::DataFusionError;
use datafusion::sql::sqlparser::parser::ParserError;

/// Shorthand used throughout freshet.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in freshet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The statement text is not valid SQL (42601).
    #[error("{message}")]
    Syntax { message: String, position: Option<usize> },

    /// A named table, view or source does not exist (42P01).
    #[error("relation \"{name}\" does not exist")]
    UndefinedTable { name: String, position: Option<usize> },

    /// A referenced column does not exist (42703).
    #[error("{message}")]
    UndefinedColumn { message: String, position: Option<usize> },

    /// CREATE of a name that is already taken (42P07).
    #[error("relation \"{name}\" already exists")]
    DuplicateTable { name: String },

    /// Types that cannot be combined or converted at plan time (42804).
    #[error("{message}")]
    TypeMismatch { message: String, position: Option<usize> },

    /// A value does not fit its type at run time, e.g. `'abc'::int` (22P02 and friends).
    #[error("{message}")]
    InvalidValue { code: &'static str, message: String },

    /// Any other problem with what the statement asks for (42000 family).
    #[error("{message}")]
    Plan { code: &'static str, message: String, position: Option<usize> },

    /// A row would duplicate a primary key (23505).
    #[error("duplicate key value violates unique constraint \"{constraint}\"")]
    UniqueViolation { constraint: String, detail: String },

    /// A NULL would be stored in a NOT NULL column (23502).
    #[error("null value in column \"{column}\" of relation \"{table}\" violates not-null constraint")]
    NotNullViolation { table: String, column: String },

    /// A construct freshet does not support yet (0A000). `feature` names it.
    #[error("{feature} is not supported")]
    NotSupported { feature: String, hint: Option<String> },

    /// The statement was cancelled by the client or a timeout (57014).
    #[error("canceling statement due to user request")]
    Canceled,

    /// The statement ran longer than the session's `statement_timeout` (57014).
    #[error("canceling statement due to statement timeout")]
    StatementTimeout,

    /// Durable storage failed; the statement did not take effect (58030).
    #[error("storage error: {0}")]
    Storage(String),

    /// Stored data could not be decoded: a corrupt or foreign file (XX001).
    #[error("corrupt data in {location}: {reason}")]
    Corrupt { location: String, reason: String },

    /// Bad configuration or startup input: flags, addresses, the --init file (F0000).
    #[error("{0}")]
    Config(String),

    /// A broken invariant inside freshet (XX000). Always a bug.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The Postgres SQLSTATE for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Error::Syntax { .. } => "42601",
            Error::UndefinedTable { .. } => "42P01",
            Error::UndefinedColumn { .. } => "42703",
            Error::DuplicateTable { .. } => "42P07",
            Error::TypeMismatch { .. } => "42804",
            Error::InvalidValue { code, .. } => code,
            Error::Plan { code, .. } => code,
            Error::UniqueViolation { .. } => "23505",
            Error::NotNullViolation { .. } => "23502",
            Error::NotSupported { .. } => "0A000",
            Error::Canceled | Error::StatementTimeout => "57014",
            Error::Storage(_) => "58030",
            Error::Corrupt { .. } => "XX001",
            Error::Config(_) => "F0000",
            Error::Internal(_) => "XX000",
        }
    }

    /// 1-based character position in the statement text the error applies to, if known.
    pub fn position(&self) -> Option<usize> {
        match self {
            Error::Syntax { position, .. }
            | Error::UndefinedTable { position, .. }
            | Error::UndefinedColumn { position, .. }
            | Error::TypeMismatch { position, .. }
            | Error::Plan { position, .. } => *position,
            _ => None,
        }
    }

    /// Secondary detail for the client (Postgres' DETAIL field).
    pub fn detail(&self) -> Option<String> {
        match self {
            Error::UniqueViolation { detail, .. } => Some(detail.clone()),
            _ => None,
        }
    }

    /// A suggestion for fixing the problem (Postgres' HINT field).
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::NotSupported { hint, .. } => hint.clone(),
            _ => None,
        }
    }

    /// Shorthand for [`Error::NotSupported`] without a hint.
    pub fn not_supported(feature: impl Into<String>) -> Self {
        Error::NotSupported { feature: feature.into(), hint: None }
    }

    /// Sets the statement position if the error has a slot for one and none is known yet.
    pub fn with_position(mut self, at: Option<usize>) -> Self {
        if let Error::Syntax { position, .. }
        | Error::UndefinedTable { position, .. }
        | Error::UndefinedColumn { position, .. }
        | Error::TypeMismatch { position, .. }
        | Error::Plan { position, .. } = &mut self
            && position.is_none()
        {
            *position = at;
        }
        self
    }

    /// Classifies a DataFusion error. `sql` is the statement text, used to turn DataFusion's
    /// line/column spans into the character position Postgres clients display.
    pub fn from_datafusion(err: DataFusionError, sql: &str) -> Self {
        let position = err
            .diagnostic()
            .and_then(|d| d.span)
            .and_then(|span| char_position(sql, span.start.line, span.start.column));
        let root = err.find_root();
        classify(root, sql).with_position(position)
    }
}

fn classify(root: &DataFusionError, sql: &str) -> Error {
    match root {
        DataFusionError::SQL(parser_error, _) => syntax_error(parser_error, sql),
        DataFusionError::SchemaError(schema_error, _) => {
            let message = schema_error.to_string();
            if message.contains("not found") || message.contains("No field named") {
                Error::UndefinedColumn { message, position: None }
            } else {
                Error::Plan { code: "42702", message, position: None }
            }
        }
        DataFusionError::NotImplemented(message) | DataFusionError::Plan(message)
            if let Some(refusal) = unplannable_subquery(message) =>
        {
            refusal
        }
        DataFusionError::NotImplemented(message) => Error::NotSupported { feature: message.clone(), hint: None },
        DataFusionError::Plan(message) => classify_plan_message(message),
        DataFusionError::ArrowError(arrow_error, _) => classify_arrow_message(&arrow_error.to_string()),
        DataFusionError::Execution(message) => classify_arrow_message(message),
        DataFusionError::ResourcesExhausted(message) => Error::InvalidValue { code: "53200", message: message.clone() },
        DataFusionError::Internal(message) => Error::Internal(message.clone()),
        DataFusionError::IoError(e) => Error::Storage(e.to_string()),
        DataFusionError::ObjectStore(e) => Error::Storage(e.to_string()),
        DataFusionError::External(e) => match e.downcast_ref::<Error>() {
            Some(inner) => clone_freshet_error(inner),
            None => Error::Internal(e.to_string()),
        },
        other => Error::Plan { code: "42000", message: other.strip_backtrace(), position: None },
    }
}

/// Freshet errors travel through DataFusion as `External`; rebuild them on the way out.
fn clone_freshet_error(e: &Error) -> Error {
    match e {
        Error::Canceled => Error::Canceled,
        other => Error::Plan { code: other.sqlstate(), message: other.to_string(), position: other.position() },
    }
}

/// DataFusion's refusals of a correlated subquery it cannot turn into a join, as what the
/// user can change. DataFusion decorrelates a subquery whose outer references are
/// equalities in its WHERE clause; a scalar one must also compute one aggregate.
fn unplannable_subquery(message: &str) -> Option<Error> {
    let feature = if message.starts_with("Physical plan does not support logical expression")
        && ["ScalarSubquery", "Exists", "InSubquery"].iter().any(|kind| message.contains(kind))
    {
        "a correlated subquery that refers to the outer query other than by equalities in its WHERE clause (e.g. `inner.x <> outer.y`, or outer columns in its select list)"
    } else if message.contains("Correlated scalar subquery must be aggregated") {
        "a correlated scalar subquery that is neither a plain `SELECT expression FROM … WHERE …` nor one aggregate (e.g. with GROUP BY, DISTINCT, UNION or LIMIT n)"
    } else {
        return None;
    };
    Some(Error::NotSupported {
        feature: feature.into(),
        hint: Some("correlate the subquery by equalities (inner.x = outer.y), or join the relation instead".into()),
    })
}

fn classify_plan_message(message: &str) -> Error {
    let lower = message.to_ascii_lowercase();
    if let Some(name) = missing_table_name(message) {
        return Error::UndefinedTable { name, position: None };
    }
    if lower.contains("cannot be cast")
        || lower.contains("cannot coerce")
        || lower.contains("cannot infer common")
        || lower.contains("no function matches")
        || lower.contains("does not support")
        || lower.contains("type mismatch")
        || lower.contains("failed to coerce")
        || lower.contains("unsupported cast")
        || (lower.contains("inserting query") && lower.contains("schema"))
    {
        return Error::TypeMismatch { message: message.to_string(), position: None };
    }
    if let Some(name) = missing_catalog_function(message) {
        return Error::NotSupported {
            feature: format!("the Postgres catalog function {name}"),
            hint: Some(
                "freshet's catalog has the functions psql, pgjdbc, SQLAlchemy and BI tools' catalog queries use (see the README's Compatibility section)"
                    .into(),
            ),
        };
    }
    if lower.contains("invalid function") || lower.contains("function") && lower.contains("not found") {
        return Error::Plan { code: "42883", message: message.to_string(), position: None };
    }
    Error::Plan { code: "42000", message: message.to_string(), position: None }
}

fn classify_arrow_message(message: &str) -> Error {
    let lower = message.to_ascii_lowercase();
    let code = if lower.contains("divide by zero") || lower.contains("division by zero") {
        "22012"
    } else if lower.contains("overflow") {
        "22003"
    } else if lower.contains("cannot cast") || lower.contains("cast error") || lower.contains("parser error") {
        "22P02"
    } else {
        "22000"
    };
    Error::InvalidValue { code, message: message.to_string() }
}

/// A Postgres system function (`pg_…`) freshet does not have, from DataFusion's "Invalid
/// function 'pg_catalog.pg_x'": what a client's catalog query freshet cannot answer
/// runs into, so 0A000 rather than 42883 (freshet has no user-defined functions, so a
/// `pg_` name is never a user's typo for one of theirs).
fn missing_catalog_function(message: &str) -> Option<String> {
    let name = message.strip_prefix("Invalid function '")?.split('\'').next()?;
    let bare = name.strip_prefix("pg_catalog.").unwrap_or(name);
    bare.starts_with("pg_").then(|| bare.to_string())
}

/// DataFusion reports a missing table as "table 'freshet.public.t' not found".
fn missing_table_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("table '")?;
    let name = rest.strip_suffix("' not found")?;
    Some(name.rsplit('.').next().unwrap_or(name).to_string())
}

/// sqlparser reports "... at Line: 1, Column: 8"; Postgres clients want a character offset.
pub(crate) fn syntax_error(err: &ParserError, sql: &str) -> Error {
    let text = match err {
        ParserError::ParserError(m) | ParserError::TokenizerError(m) => m.clone(),
        ParserError::RecursionLimitExceeded => "statement nests too deeply".to_string(),
    };
    let (message, position) = match text.rfind(" at Line: ") {
        Some(at) => {
            let location = &text[at + " at Line: ".len()..];
            let mut parts = location.split(", Column: ");
            let line = parts.next().and_then(|l| l.trim().parse::<u64>().ok());
            let column = parts.next().and_then(|c| c.trim().parse::<u64>().ok());
            let position = match (line, column) {
                (Some(l), Some(c)) => char_position(sql, l, c),
                _ => None,
            };
            (text[..at].to_string(), position)
        }
        // The parser gives no location when the statement ends too early; Postgres points
        // just past the last character then.
        None if text.ends_with("found: EOF") => (text, Some(sql.chars().count() + 1)),
        None => (text, None),
    };
    let message = if message.starts_with("Expected") || message.starts_with("expected") {
        format!("syntax error: {message}")
    } else {
        message
    };
    Error::Syntax { message, position }
}

/// Converts a 1-based line and column into a 1-based character offset into `sql`.
pub(crate) fn char_position(sql: &str, line: u64, column: u64) -> Option<usize> {
    if line == 0 || column == 0 {
        return None;
    }
    let mut offset = 0usize;
    for (index, text) in sql.split('\n').enumerate() {
        if index as u64 + 1 == line {
            return Some(offset + column as usize);
        }
        offset += text.chars().count() + 1;
    }
    None
}

impl From<DataFusionError> for Error {
    fn from(err: DataFusionError) -> Self {
        Error::from_datafusion(err, "")
    }
}

impl From<datafusion::arrow::error::ArrowError> for Error {
    fn from(err: datafusion::arrow::error::ArrowError) -> Self {
        classify_arrow_message(&err.to_string())
    }
}

impl From<object_store::Error> for Error {
    fn from(err: object_store::Error) -> Self {
        Error::Storage(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_characters_across_lines() {
        let sql = "SELECT 1;\nSELEC x";
        assert_eq!(char_position(sql, 1, 1), Some(1));
        assert_eq!(char_position(sql, 2, 1), Some(11));
        assert_eq!(char_position(sql, 3, 1), None);
    }

    #[test]
    fn parser_errors_carry_a_position() {
        let err = ParserError::ParserError("Expected: an expression, found: FROM at Line: 1, Column: 8".into());
        let e = syntax_error(&err, "SELECT FROM t");
        assert_eq!(e.sqlstate(), "42601");
        assert_eq!(e.position(), Some(8));
        assert!(e.to_string().starts_with("syntax error: Expected"), "{e}");
    }

    #[test]
    fn subqueries_datafusion_cannot_decorrelate_are_0a000() {
        for refusal in [
            DataFusionError::NotImplemented(
                "Physical plan does not support logical expression ScalarSubquery(<subquery>)".into(),
            ),
            DataFusionError::Plan("Correlated scalar subquery must be aggregated to return at most one row".into()),
        ] {
            let e = classify(&refusal, "");
            assert_eq!(e.sqlstate(), "0A000", "{e}");
            assert!(e.to_string().starts_with("a correlated"), "{e}");
        }
    }

    #[test]
    fn missing_catalog_functions_are_0a000() {
        let e = classify_plan_message(
            "Invalid function 'pg_catalog.pg_tablespace_location'.\nDid you mean 'pg_table_size'?",
        );
        assert_eq!(e.sqlstate(), "0A000", "{e}");
        assert!(e.to_string().contains("the Postgres catalog function pg_tablespace_location"), "{e}");
        let e = classify_plan_message("Invalid function 'frobnicate'.\nDid you mean 'format'?");
        assert_eq!(e.sqlstate(), "42883", "{e}");
    }

    #[test]
    fn missing_tables_are_42p01() {
        let e = classify_plan_message("table 'freshet.public.nope' not found");
        assert_eq!(e.sqlstate(), "42P01");
        assert_eq!(e.to_string(), "relation \"nope\" does not exist");
    }
}
