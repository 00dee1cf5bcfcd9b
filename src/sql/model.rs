//! freshet's model statements, parsed on top of sqlparser:
//!
//! ```sql
//! CREATE [OR REPLACE] MODEL [IF NOT EXISTS] name USING algorithm [(param = value, …)]
//!     [WITH (retrain_every = '1 hour')] AS SELECT features… [, label] FROM …
//! CREATE [OR REPLACE] MODEL [IF NOT EXISTS] name FROM 'file.json'
//! ALTER MODEL name RETRAIN
//! ALTER MODEL name SET VERSION n
//! DROP MODEL [IF EXISTS] name [CASCADE]
//! SHOW MODELS
//! DESCRIBE MODEL name
//! COPY MODEL name [VERSION n] TO 'file.json'
//! ```
//!
//! Parsing only: the catalog runs these (`catalog::model`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::Token;

use super::{ParserError, SqlParser, identifier, next_word, object_name};

/// A parsed model statement.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelStatement {
    /// `CREATE [OR REPLACE] MODEL … USING … AS SELECT …`.
    Create {
        name: String,
        or_replace: bool,
        if_not_exists: bool,
        algorithm: String,
        params: BTreeMap<String, String>,
        /// `WITH (retrain_every = '1 hour')`, as written.
        retrain_every: Option<String>,
        query: String,
    },
    /// `CREATE [OR REPLACE] MODEL name FROM 'file'`.
    Import { name: String, or_replace: bool, if_not_exists: bool, path: String },
    /// `ALTER MODEL name RETRAIN`.
    Retrain { name: String },
    /// `ALTER MODEL name SET VERSION n`.
    SetVersion { name: String, version: u32 },
    /// `DROP MODEL [IF EXISTS] name [CASCADE]`.
    Drop { name: String, if_exists: bool, cascade: bool },
    /// `SHOW MODELS`.
    Show,
    /// `DESCRIBE MODEL name`.
    Describe { name: String },
    /// `COPY MODEL name [VERSION n] TO 'file'`.
    Export { name: String, version: Option<u32>, path: String },
}

impl ModelStatement {
    /// The command tag the statement answers with.
    pub fn tag(&self) -> &'static str {
        match self {
            ModelStatement::Create { .. } | ModelStatement::Import { .. } => "CREATE MODEL",
            ModelStatement::Retrain { .. } | ModelStatement::SetVersion { .. } => "ALTER MODEL",
            ModelStatement::Drop { .. } => "DROP MODEL",
            ModelStatement::Show => "SHOW MODELS",
            ModelStatement::Describe { .. } => "DESCRIBE MODEL",
            ModelStatement::Export { .. } => "COPY",
        }
    }

    /// The columns of the rows it returns, if any.
    pub fn result_schema(&self) -> Option<SchemaRef> {
        match self {
            ModelStatement::Show => Some(show_models_schema()),
            ModelStatement::Describe { .. } => Some(describe_model_schema()),
            _ => None,
        }
    }
}

/// Whether the tokens ahead start a model statement.
pub fn starts_model_statement(parser: &SqlParser) -> bool {
    let words: Vec<Option<String>> = (0..4).map(|n| next_word(parser, n)).collect();
    let word = |n: usize| words[n].as_deref();
    match word(0) {
        Some("create") => word(1) == Some("model") || (word(1) == Some("or") && word(3) == Some("model")),
        Some("drop") | Some("alter") | Some("describe") | Some("copy") => word(1) == Some("model"),
        Some("show") => word(1) == Some("models"),
        _ => false,
    }
}

/// Parses the model statement ahead (see [`starts_model_statement`]).
pub fn parse(parser: &mut SqlParser) -> Result<ModelStatement, ParserError> {
    let first = next_word(parser, 0).unwrap_or_default();
    parser.next_token();
    match first.as_str() {
        "create" => parse_create(parser),
        "drop" => {
            parser.next_token(); // MODEL
            let if_exists = parser.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
            let name = object_name(&parser.parse_object_name(false)?);
            let cascade = parser.parse_keyword(Keyword::CASCADE);
            let _ = parser.parse_keyword(Keyword::RESTRICT);
            Ok(ModelStatement::Drop { name, if_exists, cascade })
        }
        "show" => {
            parser.next_token(); // MODELS
            Ok(ModelStatement::Show)
        }
        "describe" => {
            parser.next_token(); // MODEL
            Ok(ModelStatement::Describe { name: object_name(&parser.parse_object_name(false)?) })
        }
        "alter" => {
            parser.next_token(); // MODEL
            let name = object_name(&parser.parse_object_name(false)?);
            if next_word(parser, 0).as_deref() == Some("retrain") {
                parser.next_token();
                return Ok(ModelStatement::Retrain { name });
            }
            if parser.parse_keyword(Keyword::SET) && parser.parse_keyword(Keyword::VERSION) {
                return Ok(ModelStatement::SetVersion { name, version: parse_version(parser)? });
            }
            Err(ParserError::ParserError(format!(
                "expected RETRAIN or SET VERSION n after ALTER MODEL {name}, found {}",
                parser.peek_token()
            )))
        }
        "copy" => {
            parser.next_token(); // MODEL
            let name = object_name(&parser.parse_object_name(false)?);
            let version = if parser.parse_keyword(Keyword::VERSION) { Some(parse_version(parser)?) } else { None };
            parser.expect_keyword_is(Keyword::TO)?;
            let path = parser.parse_literal_string()?;
            Ok(ModelStatement::Export { name, version, path })
        }
        other => Err(ParserError::ParserError(format!("not a model statement: {other}"))),
    }
}

fn parse_version(parser: &mut SqlParser) -> Result<u32, ParserError> {
    match parser.next_token().token {
        Token::Number(n, _) => n
            .parse::<u32>()
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| ParserError::ParserError(format!("model version {n} is not a version number (1, 2, …)"))),
        other => Err(ParserError::ParserError(format!("expected a model version number, found {other}"))),
    }
}

fn parse_create(parser: &mut SqlParser) -> Result<ModelStatement, ParserError> {
    let or_replace = parser.parse_keywords(&[Keyword::OR, Keyword::REPLACE]);
    parser.next_token(); // MODEL
    let if_not_exists = parser.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = object_name(&parser.parse_object_name(false)?);
    if parser.parse_keyword(Keyword::FROM) {
        let path = parser.parse_literal_string()?;
        return Ok(ModelStatement::Import { name, or_replace, if_not_exists, path });
    }
    parser.expect_keyword_is(Keyword::USING)?;
    let algorithm = identifier(parser.parse_identifier()?);
    let params = if parser.peek_token().token == Token::LParen { parse_options(parser)? } else { BTreeMap::new() };
    let mut retrain_every = None;
    if parser.parse_keyword(Keyword::WITH) {
        for (key, value) in parse_options(parser)? {
            match key.as_str() {
                "retrain_every" => {
                    if parse_interval(&value).is_none() {
                        return Err(ParserError::ParserError(format!(
                            "retrain_every = '{value}' is not an interval such as '30 minutes' or '1 hour'"
                        )));
                    }
                    retrain_every = Some(value);
                }
                other => {
                    return Err(ParserError::ParserError(format!(
                        "unknown CREATE MODEL option {other} (expected retrain_every)"
                    )));
                }
            }
        }
    }
    parser.expect_keyword_is(Keyword::AS)?;
    let query = parser.parse_query()?.to_string();
    Ok(ModelStatement::Create { name, or_replace, if_not_exists, algorithm, params, retrain_every, query })
}

/// `(name = value, …)`; values are strings, numbers or words.
fn parse_options(parser: &mut SqlParser) -> Result<BTreeMap<String, String>, ParserError> {
    parser.expect_token(&Token::LParen)?;
    let mut options = BTreeMap::new();
    if parser.consume_token(&Token::RParen) {
        return Ok(options);
    }
    loop {
        let key = identifier(parser.parse_identifier()?);
        parser.expect_token(&Token::Eq)?;
        let value = match parser.next_token().token {
            Token::SingleQuotedString(s) => s,
            Token::Number(n, _) => n,
            Token::Minus => match parser.next_token().token {
                Token::Number(n, _) => format!("-{n}"),
                other => return Err(ParserError::ParserError(format!("{key} needs a value, found -{other}"))),
            },
            Token::Word(w) => w.value,
            other => {
                return Err(ParserError::ParserError(format!(
                    "{key} needs a value such as 4, 0.5 or 'mean', found {other}"
                )));
            }
        };
        if options.insert(key.clone(), value).is_some() {
            return Err(ParserError::ParserError(format!("{key} is given twice")));
        }
        if !parser.consume_token(&Token::Comma) {
            break;
        }
    }
    parser.expect_token(&Token::RParen)?;
    Ok(options)
}

/// `'90 seconds'`, `'30 minutes'`, `'1 hour'`, `'2 days'`, or the short forms `'500ms'`,
/// `'10s'`, `'5m'`, `'1h'`.
pub fn parse_interval(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.trim().parse().ok()?;
    let seconds = match unit.trim().to_ascii_lowercase().as_str() {
        "ms" | "millisecond" | "milliseconds" => number / 1000.0,
        "" | "s" | "sec" | "secs" | "second" | "seconds" => number,
        "m" | "min" | "mins" | "minute" | "minutes" => number * 60.0,
        "h" | "hour" | "hours" => number * 3600.0,
        "d" | "day" | "days" => number * 86400.0,
        _ => return None,
    };
    (seconds.is_finite() && seconds > 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// The columns of `SHOW MODELS`.
pub fn show_models_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("algorithm", DataType::Utf8, false),
        Field::new("active_version", DataType::Int64, false),
        Field::new("versions", DataType::Int64, false),
        Field::new("features", DataType::Utf8, false),
        Field::new("training_rows", DataType::Int64, false),
        Field::new("created_at", DataType::Utf8, false),
        Field::new("retrain_every", DataType::Utf8, true),
        Field::new("scored_rows", DataType::Int64, false),
        Field::new("null_scores", DataType::Int64, false),
    ]))
}

/// The columns of `DESCRIBE MODEL`: one row per version.
pub fn describe_model_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("version", DataType::Int64, false),
        Field::new("active", DataType::Boolean, false),
        Field::new("algorithm", DataType::Utf8, false),
        Field::new("params", DataType::Utf8, false),
        Field::new("features", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("training_query", DataType::Utf8, true),
        Field::new("training_rows", DataType::Int64, false),
        Field::new("metrics", DataType::Utf8, false),
        Field::new("created_at", DataType::Utf8, false),
        Field::new("retrain_every", DataType::Utf8, true),
        Field::new("null_scores", DataType::Int64, false),
    ]))
}

#[cfg(test)]
mod tests {
    use super::super::{Statement, parse as parse_sql};
    use super::*;

    fn one(sql: &str) -> ModelStatement {
        match parse_sql(sql).expect("parses").pop_front() {
            Some(Statement::Model(m)) => m,
            other => panic!("{sql} parsed as {other:?}"),
        }
    }

    #[test]
    fn parses_every_model_statement() {
        assert_eq!(
            one(
                "CREATE OR REPLACE MODEL m USING kmeans (k = 4, impute = 'mean') WITH (retrain_every = '1 hour') AS SELECT a, b FROM t"
            ),
            ModelStatement::Create {
                name: "m".into(),
                or_replace: true,
                if_not_exists: false,
                algorithm: "kmeans".into(),
                params: BTreeMap::from([("k".into(), "4".into()), ("impute".into(), "mean".into())]),
                retrain_every: Some("1 hour".into()),
                query: "SELECT a, b FROM t".into(),
            }
        );
        assert_eq!(one("alter model M set version 2"), ModelStatement::SetVersion { name: "m".into(), version: 2 });
        assert_eq!(one("ALTER MODEL m RETRAIN"), ModelStatement::Retrain { name: "m".into() });
        assert_eq!(
            one("DROP MODEL IF EXISTS m CASCADE"),
            ModelStatement::Drop { name: "m".into(), if_exists: true, cascade: true }
        );
        assert_eq!(one("show models"), ModelStatement::Show);
        assert_eq!(one("DESCRIBE MODEL m"), ModelStatement::Describe { name: "m".into() });
        assert_eq!(
            one("COPY MODEL m TO '/tmp/m.json'"),
            ModelStatement::Export { name: "m".into(), version: None, path: "/tmp/m.json".into() }
        );
        assert_eq!(
            one("CREATE MODEL m FROM '/tmp/m.json'"),
            ModelStatement::Import {
                name: "m".into(),
                or_replace: false,
                if_not_exists: false,
                path: "/tmp/m.json".into()
            }
        );
        let statements = parse_sql("CREATE MODEL m USING zscore AS SELECT a FROM t; SELECT 1").expect("parses");
        assert_eq!(statements.len(), 2);
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1 hour"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_interval("30 minutes"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_interval("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_interval("soon"), None);
        assert_eq!(parse_interval("0 s"), None);
    }
}
