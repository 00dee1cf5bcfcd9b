//! SQL text in, planned statements out.
//!
//! [`parse`] splits a query string into statements with the Postgres dialect; [`plan`]
//! turns one statement into a [`Planned`] value, letting DataFusion resolve names, coerce
//! types and optimise. Nothing here touches storage or runs a statement: the catalog
//! executes what this module plans. Freshet's own DDL (sources, views, sinks, models)
//! will be recognised here as it arrives.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::ParamValues;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{DdlStatement, LogicalPlan, WriteOp};
use datafusion::sql::parser::{DFParserBuilder, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{
    ColumnOption, DataType as SqlDataType, ObjectName, ObjectType, Statement as SqlStatement,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::Token;
use std::sync::Arc;

use crate::error::{Error, Result};

pub mod model;
pub mod temporal;
pub mod view;
pub mod windows;

/// Arrow field metadata key naming the Postgres type a column was declared with, where
/// Arrow has no type of its own for it. Its only value today is [`JSON_TYPE`].
pub const PG_TYPE_KEY: &str = "freshet.pg_type";
/// `JSON` and `JSONB` columns are stored as UTF-8 text tagged with this value.
pub const JSON_TYPE: &str = "json";

/// Arrow field metadata key marking a source's or table's event-time column: its value is
/// the watermark delay in milliseconds (`WATERMARK FOR ts AS ts - INTERVAL '5 seconds'`).
pub const WATERMARK_KEY: &str = "freshet.watermark_delay_ms";

/// The text that ends a view whose windows are emitted once, when they close.
const EMIT_ON_WINDOW_CLOSE: &str = "EMIT ON WINDOW CLOSE";

/// The event-time column of a relation and its watermark delay in milliseconds.
pub fn watermark_of(schema: &Schema) -> Option<(usize, i64)> {
    schema
        .fields()
        .iter()
        .enumerate()
        .find_map(|(i, f)| f.metadata().get(WATERMARK_KEY).and_then(|d| d.parse().ok()).map(|d| (i, d)))
}

/// `WATERMARK FOR column AS expression` in a column list, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatermarkClause {
    pub column: String,
    pub expression: String,
}

/// `schema` with `clause` as its one watermark: the column must be a timestamp and the
/// expression the column itself or the column minus a constant interval.
pub fn with_watermark(schema: &SchemaRef, clause: &WatermarkClause) -> Result<SchemaRef> {
    let usage = "WATERMARK FOR ts AS ts - INTERVAL '5 seconds'";
    let invalid = |message: String| Error::Plan { code: "42P17", message, position: None };
    let (index, field) = schema.column_with_name(&clause.column).ok_or_else(|| {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        Error::Plan {
            code: "42703",
            message: format!("WATERMARK FOR {}: no such column (the columns are {})", clause.column, names.join(", ")),
            position: None,
        }
    })?;
    if !crate::dataflow::watermark::carries_watermark(field.data_type()) {
        return Err(invalid(format!(
            "WATERMARK FOR {}: the column is {}, but event time must be a TIMESTAMP",
            clause.column,
            field.data_type()
        )));
    }
    let expression = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&clause.expression)
        .and_then(|mut parser| parser.parse_expr())
        .map_err(|e| invalid(format!("WATERMARK FOR {}: {e}", clause.column)))?;
    let is_column = |e: &datafusion::sql::sqlparser::ast::Expr| matches!(e, datafusion::sql::sqlparser::ast::Expr::Identifier(ident) if identifier(ident.clone()) == clause.column);
    let delay = match &expression {
        e if is_column(e) => Some(0),
        datafusion::sql::sqlparser::ast::Expr::BinaryOp {
            left,
            op: datafusion::sql::sqlparser::ast::BinaryOperator::Minus,
            right,
        } if is_column(left) => windows::interval_millis(right).filter(|d| *d >= 0),
        _ => None,
    };
    let delay = delay.ok_or_else(|| {
        invalid(format!(
            "WATERMARK FOR {} AS {}: the watermark must be the column minus a constant interval, as in {usage}",
            clause.column, clause.expression
        ))
    })?;
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut metadata = f.metadata().clone();
            metadata.remove(WATERMARK_KEY);
            if i == index {
                metadata.insert(WATERMARK_KEY.to_string(), delay.to_string());
            }
            f.as_ref().clone().with_metadata(metadata)
        })
        .collect();
    Ok(Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())))
}

/// `schema` without watermarks (a view's own columns have none).
pub fn without_watermark(schema: &SchemaRef) -> SchemaRef {
    if watermark_of(schema).is_none() {
        return schema.clone();
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            let mut metadata = f.metadata().clone();
            metadata.remove(WATERMARK_KEY);
            f.as_ref().clone().with_metadata(metadata)
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// Takes `WATERMARK FOR column AS expression` out of the tokens of a column list (inside
/// its parentheses), if it is there.
fn take_watermark(tokens: Vec<Token>) -> std::result::Result<(Vec<Token>, Option<WatermarkClause>), ParserError> {
    // Split into elements at top-level commas.
    let mut elements: Vec<Vec<Token>> = vec![Vec::new()];
    let mut depth = 0;
    for token in tokens {
        match token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::Comma if depth == 0 => {
                elements.push(Vec::new());
                continue;
            }
            _ => {}
        }
        elements.last_mut().expect("one element at least").push(token);
    }
    let word = |t: Option<&Token>, w: &str| matches!(t, Some(Token::Word(word)) if word.quote_style.is_none() && word.value.eq_ignore_ascii_case(w));
    let mut clause = None;
    let mut kept = Vec::new();
    for element in elements {
        let significant: Vec<Token> = element.iter().filter(|t| !matches!(t, Token::Whitespace(_))).cloned().collect();
        if word(significant.first(), "watermark") && word(significant.get(1), "for") {
            if clause.is_some() {
                return Err(ParserError::ParserError("a relation has at most one WATERMARK".into()));
            }
            let column = match significant.get(2) {
                Some(Token::Word(w)) => identifier(datafusion::sql::sqlparser::ast::Ident {
                    value: w.value.clone(),
                    quote_style: w.quote_style,
                    span: datafusion::sql::sqlparser::tokenizer::Span::empty(),
                }),
                _ => return Err(ParserError::ParserError("WATERMARK FOR needs a column name".into())),
            };
            if !word(significant.get(3), "as") || significant.len() < 5 {
                return Err(ParserError::ParserError(format!(
                    "WATERMARK FOR {column} needs AS and an expression, as in WATERMARK FOR {column} AS {column} - INTERVAL '5 seconds'"
                )));
            }
            let expression = significant[4..].iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ");
            clause = Some(WatermarkClause { column, expression });
        } else {
            kept.push(element);
        }
    }
    let mut tokens = Vec::new();
    for (i, element) in kept.into_iter().enumerate() {
        if i > 0 {
            tokens.push(Token::Comma);
        }
        tokens.extend(element);
    }
    Ok((tokens, clause))
}

/// One parsed statement, ready to plan.
#[derive(Debug, Clone)]
pub enum Statement {
    /// Anything DataFusion's parser understands.
    Sql(DFStatement),
    /// `CREATE MATERIALIZED VIEW … EMIT ON WINDOW CLOSE`.
    EmitOnWindowClose(DFStatement),
    /// `CREATE TABLE` with a `WATERMARK` in its column list (taken out of the statement).
    CreateTableWithWatermark(DFStatement, WatermarkClause),
    /// `FLUSH`: wait until every materialized view includes all writes committed so far.
    Flush,
    /// `CHECKPOINT`: store the views' operator states now and wait until that is done.
    Checkpoint,
    /// `SUBSCRIBE [TO] view [WITH (snapshot = false)]`: stream every change to a view.
    Subscribe { view: String, snapshot: bool },
    /// `DECLARE cursor CURSOR FOR SUBSCRIBE …`: a subscription read with FETCH, for
    /// drivers that cannot consume a stream.
    DeclareSubscribe { cursor: String, view: String, snapshot: bool },
    /// `FETCH [FORWARD] [ALL | NEXT | n] [FROM | IN] cursor [WITH (timeout = '1s')]`.
    Fetch { cursor: String, count: Option<usize>, timeout: Option<Duration> },
    /// `CLOSE cursor` or `CLOSE ALL` (`None`).
    Close { cursor: Option<String> },
    /// `CREATE SOURCE [IF NOT EXISTS] name [(columns…)] WITH (option = 'value', …) [FORMAT f]`.
    CreateSource {
        name: String,
        if_not_exists: bool,
        columns: Option<String>,
        watermark: Option<WatermarkClause>,
        options: BTreeMap<String, String>,
    },
    /// `DROP SOURCE [IF EXISTS] name, … [CASCADE]`.
    DropSource { names: Vec<String>, if_exists: bool, cascade: bool },
    /// `SHOW SOURCES`.
    ShowSources,
    /// `CREATE SINK [IF NOT EXISTS] name FROM view WITH (option = 'value', …) [FORMAT f]`.
    CreateSink { name: String, if_not_exists: bool, from: String, options: BTreeMap<String, String> },
    /// `DROP SINK [IF EXISTS] name, …`.
    DropSink { names: Vec<String>, if_exists: bool },
    /// `SHOW SINKS`.
    ShowSinks,
    /// CREATE / ALTER / DROP / SHOW / DESCRIBE / COPY MODEL.
    Model(model::ModelStatement),
}

/// Splits `sql` into statements. Errors carry the position of the offending token.
pub fn parse(sql: &str) -> Result<VecDeque<Statement>> {
    let dialect = PostgreSqlDialect {};
    let mut parser =
        DFParserBuilder::new(sql).with_dialect(&dialect).build().map_err(|e| Error::from_datafusion(e, sql))?;
    let mut statements = VecDeque::new();
    let mut expecting_delimiter = false;
    loop {
        while parser.parser.consume_token(&Token::SemiColon) {
            expecting_delimiter = false;
        }
        let next = parser.parser.peek_token();
        if next.token == Token::EOF {
            return Ok(statements);
        }
        if expecting_delimiter {
            let position = crate::error::char_position(sql, next.span.start.line, next.span.start.column);
            return Err(Error::Syntax { message: format!("syntax error at or near \"{next}\""), position });
        }
        // freshet's own statements come first; everything else is DataFusion's SQL.
        let keyword = match &next.token {
            Token::Word(word) if word.quote_style.is_none() => word.value.to_ascii_lowercase(),
            _ => String::new(),
        };
        if model::starts_model_statement(&parser.parser) {
            statements.push_back(Statement::Model(
                model::parse(&mut parser.parser).map_err(|e| crate::error::syntax_error(&e, sql))?,
            ));
        } else if keyword == "flush" {
            parser.parser.next_token();
            statements.push_back(Statement::Flush);
        } else if keyword == "checkpoint" {
            parser.parser.next_token();
            statements.push_back(Statement::Checkpoint);
        } else if keyword == "subscribe" {
            parser.parser.next_token();
            statements.push_back(parse_subscribe(&mut parser.parser).map_err(|e| crate::error::syntax_error(&e, sql))?);
        } else if keyword == "create" && next_word(&parser.parser, 1).as_deref() == Some("source") {
            statements
                .push_back(parse_create_source(&mut parser.parser).map_err(|e| crate::error::syntax_error(&e, sql))?);
        } else if keyword == "drop" && next_word(&parser.parser, 1).as_deref() == Some("source") {
            statements
                .push_back(parse_drop_source(&mut parser.parser).map_err(|e| crate::error::syntax_error(&e, sql))?);
        } else if keyword == "show" && next_word(&parser.parser, 1).as_deref() == Some("sources") {
            parser.parser.next_token();
            parser.parser.next_token();
            statements.push_back(Statement::ShowSources);
        } else if keyword == "create" && next_word(&parser.parser, 1).as_deref() == Some("sink") {
            statements
                .push_back(parse_create_sink(&mut parser.parser).map_err(|e| crate::error::syntax_error(&e, sql))?);
        } else if keyword == "drop" && next_word(&parser.parser, 1).as_deref() == Some("sink") {
            statements.push_back(
                parse_drop_source(&mut parser.parser)
                    .map(|dropped| match dropped {
                        Statement::DropSource { names, if_exists, .. } => Statement::DropSink { names, if_exists },
                        other => other,
                    })
                    .map_err(|e| crate::error::syntax_error(&e, sql))?,
            );
        } else if keyword == "show" && next_word(&parser.parser, 1).as_deref() == Some("sinks") {
            parser.parser.next_token();
            parser.parser.next_token();
            statements.push_back(Statement::ShowSinks);
        } else if keyword == "declare" && declares_subscribe(&parser.parser) {
            statements.push_back(parse_declare(&mut parser.parser).map_err(|e| crate::error::syntax_error(&e, sql))?);
        } else if keyword == "fetch" {
            parser.parser.next_token();
            statements.push_back(parse_fetch(&mut parser.parser).map_err(|e| crate::error::syntax_error(&e, sql))?);
        } else if keyword == "close" {
            parser.parser.next_token();
            let cursor = match parser.parser.parse_keyword(Keyword::ALL) {
                true => None,
                false => {
                    Some(identifier(parser.parser.parse_identifier().map_err(|e| crate::error::syntax_error(&e, sql))?))
                }
            };
            statements.push_back(Statement::Close { cursor });
        } else if keyword == "create"
            && next_word(&parser.parser, 1).as_deref() == Some("table")
            && has_watermark(&parser.parser)
        {
            statements.push_back(parse_create_table_with_watermark(&mut parser.parser, sql)?);
        } else {
            let mut statement = parser.parse_statement().map_err(|e| Error::from_datafusion(e, sql))?;
            windows::rewrite(&mut statement)?;
            let creates_view = |s: &DFStatement| matches!(s, DFStatement::Statement(inner) if matches!(inner.as_ref(), SqlStatement::CreateView(c) if c.materialized));
            let is_materialized_view = match &statement {
                DFStatement::Explain(explain) => creates_view(&explain.statement),
                other => creates_view(other),
            };
            if is_materialized_view
                && ["emit", "on", "window", "close"]
                    .iter()
                    .enumerate()
                    .all(|(i, w)| next_word(&parser.parser, i).as_deref() == Some(*w))
            {
                (0..4).for_each(|_| {
                    parser.parser.next_token();
                });
                statements.push_back(Statement::EmitOnWindowClose(statement));
            } else {
                statements.push_back(Statement::Sql(statement));
            }
        }
        expecting_delimiter = true;
    }
}

type SqlParser<'a> = datafusion::sql::sqlparser::parser::Parser<'a>;
type ParserError = datafusion::sql::sqlparser::parser::ParserError;

/// An identifier as Postgres resolves it: folded to lower case unless quoted.
fn identifier(ident: datafusion::sql::sqlparser::ast::Ident) -> String {
    if ident.quote_style.is_some() { ident.value } else { ident.value.to_ascii_lowercase() }
}

/// The `n`th token ahead, lower-cased, if it is an unquoted word.
fn next_word(parser: &SqlParser, n: usize) -> Option<String> {
    match parser.peek_nth_token(n).token {
        Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_ascii_lowercase()),
        _ => None,
    }
}

/// The tokens of a column list, after its `(` up to its matching `)` (consumed).
fn column_list(parser: &mut SqlParser) -> std::result::Result<Vec<Token>, ParserError> {
    let mut tokens = Vec::new();
    let mut depth = 1;
    loop {
        let token = parser.next_token().token;
        match token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::EOF => return Err(ParserError::ParserError("unclosed column list".into())),
            _ => {}
        }
        if depth == 0 {
            return Ok(tokens);
        }
        tokens.push(token);
    }
}

/// Whether the statement ahead (up to `;`) has `WATERMARK FOR` in a column list.
fn has_watermark(parser: &SqlParser) -> bool {
    let mut depth = 0;
    for n in 0.. {
        match parser.peek_nth_token(n).token {
            Token::EOF => return false,
            Token::SemiColon if depth == 0 => return false,
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::Word(w)
                if depth == 1
                    && w.quote_style.is_none()
                    && w.value.eq_ignore_ascii_case("watermark")
                    && next_word(parser, n + 1).as_deref() == Some("for") =>
            {
                return true;
            }
            _ => {}
        }
    }
    false
}

/// `CREATE TABLE name (columns…, WATERMARK FOR column AS expression) …`: the statement
/// without the watermark, parsed by DataFusion, and the watermark.
fn parse_create_table_with_watermark(parser: &mut SqlParser, sql: &str) -> Result<Statement> {
    let mut before = Vec::new();
    while !matches!(parser.peek_token().token, Token::LParen | Token::EOF | Token::SemiColon) {
        before.push(parser.next_token().token);
    }
    parser.next_token(); // (
    let list = column_list(parser).map_err(|e| crate::error::syntax_error(&e, sql))?;
    let mut after = Vec::new();
    while !matches!(parser.peek_token().token, Token::EOF | Token::SemiColon) {
        after.push(parser.next_token().token);
    }
    let (list, clause) = take_watermark(list).map_err(|e| crate::error::syntax_error(&e, sql))?;
    let clause = clause.ok_or_else(|| Error::Internal("a watermark was found and then lost".into()))?;
    let text = |tokens: &[Token]| tokens.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ");
    let rebuilt = format!("{} ({}) {}", text(&before), text(&list), text(&after));
    let mut statements = DFParserBuilder::new(rebuilt.as_str())
        .with_dialect(&PostgreSqlDialect {})
        .build()
        .and_then(|mut parser| parser.parse_statements())
        .map_err(|e| Error::from_datafusion(e, &rebuilt).with_position(None))?;
    let statement = statements.pop_front().ok_or_else(|| Error::Internal("CREATE TABLE went missing".into()))?;
    Ok(Statement::CreateTableWithWatermark(statement, clause))
}

/// `CREATE SOURCE [IF NOT EXISTS] name [(columns…)] WITH (option = value, …) [FORMAT f]`.
fn parse_create_source(parser: &mut SqlParser) -> std::result::Result<Statement, ParserError> {
    parser.next_token(); // CREATE
    parser.next_token(); // SOURCE
    let if_not_exists = parser.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = object_name(&parser.parse_object_name(false)?);
    let mut columns = None;
    let mut watermark = None;
    if parser.consume_token(&Token::LParen) {
        // Declared columns, as text: planned like a CREATE TABLE's.
        let (tokens, clause) = take_watermark(column_list(parser)?)?;
        watermark = clause;
        if !tokens.is_empty() {
            columns = Some(tokens.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" "));
        }
    }
    let mut options = BTreeMap::new();
    parse_include(parser, &mut options)?;
    parse_with_options(parser, &mut options)?;
    parse_format(parser, &mut options)?;
    parse_include(parser, &mut options)?;
    Ok(Statement::CreateSource { name, if_not_exists, columns, watermark, options })
}

/// `WITH (option = value, …)`, if present; option names are lower-cased.
fn parse_with_options(
    parser: &mut SqlParser,
    options: &mut BTreeMap<String, String>,
) -> std::result::Result<(), ParserError> {
    if !parser.parse_keyword(Keyword::WITH) {
        return Ok(());
    }
    parser.expect_token(&Token::LParen)?;
    loop {
        // Dotted names pass settings through, as in `properties.security.protocol`.
        let mut option = parser.parse_identifier()?.value.to_ascii_lowercase();
        while parser.consume_token(&Token::Period) {
            option = format!("{option}.{}", parser.parse_identifier()?.value.to_ascii_lowercase());
        }
        parser.expect_token(&Token::Eq)?;
        let value = match parser.next_token().token {
            Token::SingleQuotedString(s) => s,
            Token::Number(n, _) => n,
            Token::Word(w) => w.value,
            other => {
                return Err(ParserError::ParserError(format!(
                    "option {option} needs a value such as 'text' or 42, found {other}"
                )));
            }
        };
        if options.insert(option.clone(), value).is_some() {
            return Err(ParserError::ParserError(format!("option {option} is given twice")));
        }
        if !parser.consume_token(&Token::Comma) {
            break;
        }
    }
    parser.expect_token(&Token::RParen)?;
    Ok(())
}

/// `FORMAT name`, if present, as option `format`.
fn parse_format(
    parser: &mut SqlParser,
    options: &mut BTreeMap<String, String>,
) -> std::result::Result<(), ParserError> {
    if parser.parse_keyword(Keyword::FORMAT) {
        let format = parser.parse_identifier()?.value.to_ascii_lowercase();
        if options.insert("format".into(), format).is_some() {
            return Err(ParserError::ParserError("the format is given twice (FORMAT and format = …)".into()));
        }
    }
    Ok(())
}

/// `INCLUDE what [AS column], …` (a Kafka source's metadata columns), if present, as
/// option `include`.
fn parse_include(
    parser: &mut SqlParser,
    options: &mut BTreeMap<String, String>,
) -> std::result::Result<(), ParserError> {
    if next_word(parser, 0).as_deref() != Some("include") {
        return Ok(());
    }
    parser.next_token();
    let mut items = Vec::new();
    loop {
        let what = parser.parse_identifier()?.value.to_ascii_lowercase();
        match parser.parse_keyword(Keyword::AS) {
            true => items.push(format!("{what} as {}", identifier(parser.parse_identifier()?))),
            false => items.push(what),
        }
        if !parser.consume_token(&Token::Comma) {
            break;
        }
    }
    if options.insert("include".into(), items.join(",")).is_some() {
        return Err(ParserError::ParserError("INCLUDE is given twice".into()));
    }
    Ok(())
}

/// `CREATE SINK [IF NOT EXISTS] name FROM view WITH (option = value, …) [FORMAT f]`.
fn parse_create_sink(parser: &mut SqlParser) -> std::result::Result<Statement, ParserError> {
    parser.next_token(); // CREATE
    parser.next_token(); // SINK
    let if_not_exists = parser.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = object_name(&parser.parse_object_name(false)?);
    parser.expect_keyword(Keyword::FROM)?;
    let from = object_name(&parser.parse_object_name(false)?);
    let mut options = BTreeMap::new();
    parse_with_options(parser, &mut options)?;
    parse_format(parser, &mut options)?;
    Ok(Statement::CreateSink { name, if_not_exists, from, options })
}

/// `DROP SOURCE [IF EXISTS] name, … [CASCADE | RESTRICT]`.
fn parse_drop_source(parser: &mut SqlParser) -> std::result::Result<Statement, ParserError> {
    parser.next_token(); // DROP
    parser.next_token(); // SOURCE
    let if_exists = parser.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
    let mut names = vec![object_name(&parser.parse_object_name(false)?)];
    while parser.consume_token(&Token::Comma) {
        names.push(object_name(&parser.parse_object_name(false)?));
    }
    let cascade = parser.parse_keyword(Keyword::CASCADE);
    let _ = parser.parse_keyword(Keyword::RESTRICT);
    Ok(Statement::DropSource { names, if_exists, cascade })
}

/// Whether the DECLARE ahead declares a cursor over SUBSCRIBE (`… FOR SUBSCRIBE`).
fn declares_subscribe(parser: &SqlParser) -> bool {
    let word = |n: usize| match parser.peek_nth_token(n).token {
        Token::Word(w) => Some(w.value.to_ascii_lowercase()),
        _ => None,
    };
    (1..12).find(|&n| word(n).as_deref() == Some("for")).is_some_and(|n| word(n + 1).as_deref() == Some("subscribe"))
}

/// `DECLARE name [options] CURSOR [WITH[OUT] HOLD] FOR SUBSCRIBE …`.
fn parse_declare(parser: &mut SqlParser) -> std::result::Result<Statement, ParserError> {
    parser.next_token();
    let cursor = identifier(parser.parse_identifier()?);
    while !parser.parse_keyword(Keyword::FOR) {
        parser.next_token();
    }
    parser.next_token(); // SUBSCRIBE
    match parse_subscribe(parser)? {
        Statement::Subscribe { view, snapshot } => Ok(Statement::DeclareSubscribe { cursor, view, snapshot }),
        _ => Err(ParserError::ParserError("expected SUBSCRIBE".into())),
    }
}

/// The rest of `FETCH [FORWARD] [ALL | NEXT | n] [FROM | IN] cursor [WITH (timeout = '1s')]`.
fn parse_fetch(parser: &mut SqlParser) -> std::result::Result<Statement, ParserError> {
    let _ = parser.parse_keyword(Keyword::FORWARD);
    let count = if parser.parse_keyword(Keyword::ALL) {
        None
    } else if parser.parse_keyword(Keyword::NEXT) {
        Some(1)
    } else if let Token::Number(n, _) = parser.peek_token().token {
        parser.next_token();
        Some(n.parse::<usize>().map_err(|_| ParserError::ParserError(format!("FETCH count {n} is not a row count")))?)
    } else {
        Some(1)
    };
    let _ = parser.parse_one_of_keywords(&[Keyword::FROM, Keyword::IN]);
    let cursor = identifier(parser.parse_identifier()?);
    let mut timeout = None;
    if parser.parse_keyword(Keyword::WITH) {
        parser.expect_token(&Token::LParen)?;
        let option = parser.parse_identifier()?.value.to_ascii_lowercase();
        parser.expect_token(&Token::Eq)?;
        let value = parser.parse_value()?.value.to_string();
        if option != "timeout" {
            return Err(ParserError::ParserError(format!("unknown FETCH option {option} (expected timeout)")));
        }
        timeout = Some(parse_duration(value.trim_matches('\'')).ok_or_else(|| {
            ParserError::ParserError(format!("FETCH timeout {value} is not a duration such as '500ms' or '2s'"))
        })?);
        parser.expect_token(&Token::RParen)?;
    }
    Ok(Statement::Fetch { cursor, count, timeout })
}

/// `500ms`, `2s`, `1m` or a number of seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" | "min" => number * 60.0,
        _ => return None,
    };
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// The rest of `SUBSCRIBE [TO] name [WITH (snapshot = true|false)]`.
fn parse_subscribe(parser: &mut SqlParser) -> std::result::Result<Statement, ParserError> {
    let _ = parser.parse_keyword(Keyword::TO);
    let view = object_name(&parser.parse_object_name(false)?);
    let mut snapshot = true;
    if parser.parse_keyword(Keyword::WITH) {
        parser.expect_token(&Token::LParen)?;
        loop {
            let option = parser.parse_identifier()?;
            parser.expect_token(&Token::Eq)?;
            let value = parser.parse_identifier()?;
            match (option.value.to_ascii_lowercase().as_str(), value.value.to_ascii_lowercase().as_str()) {
                ("snapshot", "true") => snapshot = true,
                ("snapshot", "false") => snapshot = false,
                (name, value) => {
                    return Err(datafusion::sql::sqlparser::parser::ParserError::ParserError(format!(
                        "unknown SUBSCRIBE option {name} = {value} (expected snapshot = true or false)"
                    )));
                }
            }
            if !parser.consume_token(&Token::Comma) {
                break;
            }
        }
        parser.expect_token(&Token::RParen)?;
    }
    Ok(Statement::Subscribe { view, snapshot })
}

/// A statement after planning: what the catalog has to do.
#[derive(Debug, Clone)]
pub enum Planned {
    /// A read: run it as a DataFusion batch query and stream the rows.
    Query(LogicalPlan),
    /// INSERT, UPDATE or DELETE on a table.
    Write(LogicalPlan),
    /// CREATE TABLE, possibly `AS SELECT`.
    CreateTable(CreateTable),
    /// DROP TABLE, DROP MATERIALIZED VIEW or DROP VIEW.
    Drop(DropRelations),
    /// SHOW TABLES.
    ShowTables,
    /// CREATE MATERIALIZED VIEW.
    CreateView(CreateView),
    /// SHOW MATERIALIZED VIEWS.
    ShowViews,
    /// FLUSH.
    Flush,
    /// CHECKPOINT.
    Checkpoint,
    /// EXPLAIN CREATE MATERIALIZED VIEW: the dataflow, one line per operator.
    ExplainView(Vec<String>),
    /// CREATE VIEW.
    CreatePlainView(CreateView),
    /// SUBSCRIBE: `(epoch, diff, columns…)` rows as the view changes, until the client leaves.
    Subscribe { view: String, snapshot: bool, schema: SchemaRef },
    /// DECLARE … CURSOR FOR SUBSCRIBE; the connection keeps the cursor.
    DeclareSubscribe { cursor: String, view: String, snapshot: bool, schema: SchemaRef },
    /// FETCH from a cursor; `schema` is the cursor's, when the connection knows it.
    Fetch { cursor: String, count: Option<usize>, timeout: Option<Duration>, schema: Option<SchemaRef> },
    /// CLOSE a cursor (`None`: all of them).
    Close { cursor: Option<String> },
    /// CREATE SOURCE, with the declared columns if any.
    CreateSource {
        name: String,
        if_not_exists: bool,
        columns: Option<SchemaRef>,
        watermark: Option<WatermarkClause>,
        options: BTreeMap<String, String>,
    },
    /// SHOW SOURCES.
    ShowSources,
    /// CREATE SINK.
    CreateSink { name: String, if_not_exists: bool, from: String, options: BTreeMap<String, String> },
    /// SHOW SINKS.
    ShowSinks,
    /// A model statement; the catalog plans its training query when it runs it.
    Model(model::ModelStatement),
}

/// The kinds of relation a user creates and drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelationKind {
    Table,
    /// Rows appended by a connector.
    Source,
    MaterializedView,
    /// A plain view: a named query, inlined where it is used.
    View,
    /// Not a relation, but named among them: writes a view's changes out.
    Sink,
}

impl RelationKind {
    /// The kind in words, for messages.
    pub fn noun(self) -> &'static str {
        match self {
            RelationKind::Table => "table",
            RelationKind::Source => "source",
            RelationKind::MaterializedView => "materialized view",
            RelationKind::View => "view",
            RelationKind::Sink => "sink",
        }
    }

    /// The statement that drops this kind, also its command tag.
    pub fn drop_tag(self) -> &'static str {
        match self {
            RelationKind::Table => "DROP TABLE",
            RelationKind::Source => "DROP SOURCE",
            RelationKind::MaterializedView => "DROP MATERIALIZED VIEW",
            RelationKind::View => "DROP VIEW",
            RelationKind::Sink => "DROP SINK",
        }
    }
}

/// A planned DROP.
#[derive(Debug, Clone)]
pub struct DropRelations {
    pub kind: RelationKind,
    pub names: Vec<String>,
    pub if_exists: bool,
    /// Also drop the views that read what is dropped.
    pub cascade: bool,
}

/// A planned CREATE [MATERIALIZED] VIEW.
#[derive(Debug, Clone)]
pub struct CreateView {
    pub name: String,
    pub if_not_exists: bool,
    /// The plan of the view's query: optimised for a materialized view (it is lowered to a
    /// dataflow), as written for a plain view (the planner inlines it where it is used).
    pub plan: LogicalPlan,
    /// The query's SQL text, stored so the view can be planned again after a restart.
    pub query: String,
    /// Relations the query names (tables, materialized and plain views).
    pub reads: Vec<String>,
    /// `EMIT ON WINDOW CLOSE`: the view holds each row back until its window closes.
    pub emit_on_window_close: bool,
}

/// A planned CREATE TABLE.
#[derive(Debug, Clone)]
pub struct CreateTable {
    pub name: String,
    pub if_not_exists: bool,
    /// Column types, names and nullability.
    pub schema: SchemaRef,
    /// Indices of the primary key columns; empty without a primary key.
    pub primary_key: Vec<usize>,
    /// `(column, SQL text of its DEFAULT expression)`; kept as text so it can be stored.
    pub defaults: Vec<(String, String)>,
    /// The rows of `CREATE TABLE … AS SELECT`, if any.
    pub source: Option<LogicalPlan>,
}

impl Planned {
    /// The Postgres types a client must bind for `$1, $2, …`, in order.
    pub fn parameter_types(&self) -> Result<Vec<Option<DataType>>> {
        let plan = match self {
            Planned::Query(plan) | Planned::Write(plan) => plan,
            _ => return Ok(Vec::new()),
        };
        let types = plan.get_parameter_types()?;
        let mut numbered: Vec<(usize, Option<DataType>)> = types
            .into_iter()
            .filter_map(|(id, ty)| id.trim_start_matches('$').parse::<usize>().ok().map(|n| (n, ty)))
            .collect();
        numbered.sort_by_key(|(n, _)| *n);
        let count = numbered.last().map_or(0, |(n, _)| *n);
        let mut out = vec![None; count];
        for (n, ty) in numbered {
            out[n - 1] = ty;
        }
        Ok(out)
    }

    /// The shape of the rows this statement returns; `None` if it returns a command tag.
    pub fn result_schema(&self) -> Option<SchemaRef> {
        match self {
            Planned::Query(plan) => Some(Arc::new(plan.schema().as_arrow().clone())),
            Planned::ShowTables | Planned::ShowViews | Planned::ShowSources | Planned::ShowSinks => {
                Some(show_tables_schema())
            }
            Planned::ExplainView(_) => Some(explain_schema()),
            Planned::Subscribe { schema, .. } => Some(schema.clone()),
            Planned::Fetch { schema, .. } => schema.clone(),
            Planned::Model(statement) => statement.result_schema(),
            _ => None,
        }
    }

    /// Substitutes bound parameter values into the plan.
    pub fn with_parameters(self, params: ParamValues) -> Result<Planned> {
        Ok(match self {
            Planned::Query(plan) => Planned::Query(plan.replace_params_with_values(&params)?),
            Planned::Write(plan) => Planned::Write(plan.replace_params_with_values(&params)?),
            other => other,
        })
    }
}

/// The schema of a source's declared columns, planned as a CREATE TABLE's would be.
async fn declared_columns(state: &SessionState, text: &str) -> Result<SchemaRef> {
    let sql = format!("CREATE TABLE freshet_declared_columns ({text})");
    let mut statements = parse(&sql)?;
    let statement = statements.pop_front().ok_or_else(|| Error::Internal("no column list".into()))?;
    match Box::pin(plan(state, &statement, &sql)).await {
        Ok(Planned::CreateTable(create)) if create.primary_key.is_empty() && create.defaults.is_empty() => {
            Ok(create.schema)
        }
        Ok(_) => Err(Error::not_supported("PRIMARY KEY or DEFAULT in a source's columns")),
        Err(e) => Err(e.with_position(None)),
    }
}

/// The column of `EXPLAIN CREATE MATERIALIZED VIEW`.
pub fn explain_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("dataflow", DataType::Utf8, false)]))
}

/// The columns of `SHOW TABLES`.
pub fn show_tables_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("name", DataType::Utf8, false)]))
}

/// Plans one statement against the tables `state` can see. `sql` is the full query text,
/// used only to place error positions.
pub async fn plan(state: &SessionState, statement: &Statement, sql: &str) -> Result<Planned> {
    let statement = match statement {
        Statement::Flush => return Ok(Planned::Flush),
        Statement::Checkpoint => return Ok(Planned::Checkpoint),
        Statement::DeclareSubscribe { cursor, view, snapshot } => {
            let subscribe = Statement::Subscribe { view: view.clone(), snapshot: *snapshot };
            let Planned::Subscribe { schema, .. } = Box::pin(plan(state, &subscribe, sql)).await? else {
                return Err(Error::Internal("SUBSCRIBE planned as something else".into()));
            };
            return Ok(Planned::DeclareSubscribe {
                cursor: cursor.clone(),
                view: view.clone(),
                snapshot: *snapshot,
                schema,
            });
        }
        Statement::Fetch { cursor, count, timeout } => {
            return Ok(Planned::Fetch { cursor: cursor.clone(), count: *count, timeout: *timeout, schema: None });
        }
        Statement::Close { cursor } => return Ok(Planned::Close { cursor: cursor.clone() }),
        Statement::CreateSource { name, if_not_exists, columns, watermark, options } => {
            let columns = match columns {
                None => None,
                Some(text) => Some(declared_columns(state, text).await?),
            };
            return Ok(Planned::CreateSource {
                name: name.clone(),
                if_not_exists: *if_not_exists,
                columns,
                watermark: watermark.clone(),
                options: options.clone(),
            });
        }
        Statement::EmitOnWindowClose(statement) => {
            let (explain, inner) = match statement {
                DFStatement::Explain(explain) => (true, explain.statement.as_ref()),
                other => (false, other),
            };
            let DFStatement::Statement(inner) = inner else {
                return Err(Error::Internal("EMIT ON WINDOW CLOSE on something other than a view".into()));
            };
            let SqlStatement::CreateView(create) = inner.as_ref() else {
                return Err(Error::Internal("EMIT ON WINDOW CLOSE on something other than a view".into()));
            };
            let query = format!("{} {EMIT_ON_WINDOW_CLOSE}", create.query);
            let planned = plan_view(state, object_name(&create.name), create.if_not_exists, &query).await?;
            return match (explain, planned) {
                (true, Planned::CreateView(view)) => {
                    let root = view::lower_view(state, &view.plan, view.emit_on_window_close)?;
                    Ok(Planned::ExplainView(root.describe().lines().map(str::to_string).collect()))
                }
                (_, planned) => Ok(planned),
            };
        }
        Statement::CreateTableWithWatermark(statement, clause) => {
            let Planned::CreateTable(mut create) =
                Box::pin(plan(state, &Statement::Sql(statement.clone()), sql)).await?
            else {
                return Err(Error::Internal("CREATE TABLE planned as something else".into()));
            };
            if !create.primary_key.is_empty() {
                return Err(Error::NotSupported {
                    feature: "a PRIMARY KEY on a table with a WATERMARK".into(),
                    hint: Some("a table with a watermark only takes appended rows; leave out the key".into()),
                });
            }
            if create.source.is_some() {
                return Err(Error::not_supported("CREATE TABLE … AS with a WATERMARK"));
            }
            create.schema = with_watermark(&create.schema, clause)?;
            return Ok(Planned::CreateTable(create));
        }
        Statement::DropSource { names, if_exists, cascade } => {
            return Ok(Planned::Drop(DropRelations {
                kind: RelationKind::Source,
                names: names.clone(),
                if_exists: *if_exists,
                cascade: *cascade,
            }));
        }
        Statement::ShowSources => return Ok(Planned::ShowSources),
        Statement::CreateSink { name, if_not_exists, from, options } => {
            return Ok(Planned::CreateSink {
                name: name.clone(),
                if_not_exists: *if_not_exists,
                from: from.clone(),
                options: options.clone(),
            });
        }
        Statement::DropSink { names, if_exists } => {
            return Ok(Planned::Drop(DropRelations {
                kind: RelationKind::Sink,
                names: names.clone(),
                if_exists: *if_exists,
                cascade: false,
            }));
        }
        Statement::ShowSinks => return Ok(Planned::ShowSinks),
        Statement::Model(statement) => return Ok(Planned::Model(statement.clone())),
        Statement::Subscribe { view, snapshot } => {
            let provider = state
                .catalog_list()
                .catalog(&state.config_options().catalog.default_catalog)
                .and_then(|c| c.schema(&state.config_options().catalog.default_schema))
                .ok_or_else(|| Error::Internal("the default schema is missing".into()))?;
            let table = provider
                .table(view)
                .await?
                .ok_or_else(|| Error::UndefinedTable { name: view.clone(), position: locate_word(sql, view) })?;
            let mut fields =
                vec![Field::new("epoch", DataType::Int64, false), Field::new("diff", DataType::Int64, false)];
            fields.extend(table.schema().fields().iter().map(|f| f.as_ref().clone()));
            let schema = Arc::new(Schema::new(fields));
            return Ok(Planned::Subscribe { view: view.clone(), snapshot: *snapshot, schema });
        }
        Statement::Sql(statement) => statement,
    };
    let df_error = |e| Error::from_datafusion(e, sql);
    if let DFStatement::Statement(inner) = statement {
        match inner.as_ref() {
            SqlStatement::ShowTables { .. } => return Ok(Planned::ShowTables),
            SqlStatement::ShowViews { materialized: true, .. } => return Ok(Planned::ShowViews),
            SqlStatement::CreateView(create) if create.materialized => {
                if create.or_replace || create.or_alter {
                    return Err(Error::not_supported("CREATE OR REPLACE MATERIALIZED VIEW"));
                }
                if !create.columns.is_empty() {
                    return Err(Error::NotSupported {
                        feature: "a column list in CREATE MATERIALIZED VIEW".into(),
                        hint: Some("name the columns with AS aliases in the query".into()),
                    });
                }
                return plan_view(state, object_name(&create.name), create.if_not_exists, &create.query.to_string())
                    .await;
            }
            SqlStatement::CreateView(create) => {
                if create.or_replace || create.or_alter {
                    return Err(Error::not_supported("CREATE OR REPLACE VIEW"));
                }
                if !create.columns.is_empty() {
                    return Err(Error::NotSupported {
                        feature: "a column list in CREATE VIEW".into(),
                        hint: Some("name the columns with AS aliases in the query".into()),
                    });
                }
                let query = create.query.to_string();
                let (plan, reads) = plan_query(state, &query).await?;
                return Ok(Planned::CreatePlainView(CreateView {
                    name: object_name(&create.name),
                    if_not_exists: create.if_not_exists,
                    plan,
                    query,
                    reads,
                    emit_on_window_close: false,
                }));
            }
            SqlStatement::Drop { object_type, if_exists, names, cascade, .. }
                if matches!(object_type, ObjectType::Table | ObjectType::View | ObjectType::MaterializedView) =>
            {
                let kind = match object_type {
                    ObjectType::Table => RelationKind::Table,
                    ObjectType::View => RelationKind::View,
                    _ => RelationKind::MaterializedView,
                };
                let names = names.iter().map(object_name).collect();
                return Ok(Planned::Drop(DropRelations { kind, names, if_exists: *if_exists, cascade: *cascade }));
            }
            SqlStatement::StartTransaction { .. } | SqlStatement::Commit { .. } | SqlStatement::Rollback { .. } => {
                return Err(Error::NotSupported {
                    feature: "transaction blocks".into(),
                    hint: Some("every statement commits on its own; run it without BEGIN/COMMIT".into()),
                });
            }
            _ => {}
        }
    }
    if let DFStatement::Explain(explain) = statement
        && let DFStatement::Statement(inner) = explain.statement.as_ref()
        && let SqlStatement::CreateView(create) = inner.as_ref()
        && create.materialized
    {
        let Planned::CreateView(view) =
            plan_view(state, object_name(&create.name), false, &create.query.to_string()).await?
        else {
            return Err(Error::Internal("a view query planned as something else".into()));
        };
        let lines = view::lower_view(state, &view.plan, view.emit_on_window_close)?
            .describe()
            .lines()
            .map(str::to_string)
            .collect();
        return Ok(Planned::ExplainView(lines));
    }
    if let DFStatement::CreateExternalTable(_) | DFStatement::CopyTo(_) | DFStatement::Reset(_) = statement {
        return Err(Error::not_supported(first_words(statement)));
    }
    let mut statement = statement.clone();
    let json_columns = take_json_columns(&mut statement);
    let statement = &statement;
    let plan = state.statement_to_plan(statement.clone()).await.map_err(df_error)?;
    match plan {
        LogicalPlan::Dml(ref dml) => match dml.op {
            WriteOp::Insert(_) | WriteOp::Update | WriteOp::Delete => Ok(Planned::Write(plan)),
            _ => Err(Error::not_supported(first_words(statement))),
        },
        LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(create)) => {
            // A table's watermark is its own (CREATE TABLE … AS does not copy a source's).
            let schema = without_watermark(&tag_json_columns(create.input.schema().as_arrow(), &json_columns));
            let primary_key = create
                .constraints
                .iter()
                .find_map(|c| match c {
                    datafusion::common::Constraint::PrimaryKey(cols) => Some(cols.clone()),
                    datafusion::common::Constraint::Unique(_) => None,
                })
                .unwrap_or_default();
            if create.constraints.iter().any(|c| matches!(c, datafusion::common::Constraint::Unique(_))) {
                return Err(Error::NotSupported {
                    feature: "UNIQUE constraints".into(),
                    hint: Some("declare the column as PRIMARY KEY instead".into()),
                });
            }
            if create.or_replace {
                return Err(Error::not_supported("CREATE OR REPLACE TABLE"));
            }
            if create.temporary {
                return Err(Error::not_supported("CREATE TEMPORARY TABLE"));
            }
            let source = match create.input.as_ref() {
                LogicalPlan::EmptyRelation(_) => None,
                other => Some(other.clone()),
            };
            Ok(Planned::CreateTable(CreateTable {
                name: create.name.table().to_string(),
                if_not_exists: create.if_not_exists,
                schema,
                primary_key,
                defaults: column_default_texts(statement),
                source,
            }))
        }
        LogicalPlan::Ddl(_) | LogicalPlan::Copy(_) => Err(Error::not_supported(first_words(statement))),
        LogicalPlan::Statement(_) => Err(Error::not_supported(first_words(statement))),
        query => Ok(Planned::Query(query)),
    }
}

/// Plans a materialized view's query (`query` is its SQL text).
pub async fn plan_view(state: &SessionState, name: String, if_not_exists: bool, query: &str) -> Result<Planned> {
    let trimmed = query.trim_end();
    let (select, emit_on_window_close) = match trimmed.len().checked_sub(EMIT_ON_WINDOW_CLOSE.len()) {
        Some(at) if trimmed.is_char_boundary(at) && trimmed[at..].eq_ignore_ascii_case(EMIT_ON_WINDOW_CLOSE) => {
            (&trimmed[..at], true)
        }
        _ => (query, false),
    };
    let (plan, reads) = plan_query(state, select).await?;
    let plan = temporal::rewrite(plan)?;
    view::check_deterministic(&plan)?;
    let plan = state.optimize(&plan).map_err(|e| Error::from_datafusion(e, select))?;
    Ok(Planned::CreateView(CreateView {
        name,
        if_not_exists,
        plan,
        query: query.to_string(),
        reads,
        emit_on_window_close,
    }))
}

/// Plans a view's query text (unoptimised) and lists the relations it names, plain views
/// included (the optimiser inlines those, so they are collected first).
pub async fn plan_query(state: &SessionState, query: &str) -> Result<(LogicalPlan, Vec<String>)> {
    let dialect = PostgreSqlDialect {};
    let mut statements = DFParserBuilder::new(query)
        .with_dialect(&dialect)
        .build()
        .and_then(|mut parser| parser.parse_statements())
        .map_err(|e| Error::from_datafusion(e, query))?;
    let mut statement = statements.pop_front().ok_or_else(|| Error::Internal("a view without a query".into()))?;
    windows::rewrite(&mut statement)?;
    let plan = state.statement_to_plan(statement).await.map_err(|e| Error::from_datafusion(e, query))?;
    let mut reads = Vec::new();
    plan.apply_with_subqueries(|node| {
        // The planner inlines plain views as an alias over their query.
        let name = match node {
            LogicalPlan::TableScan(scan) => Some(scan.table_name.table().to_string()),
            LogicalPlan::SubqueryAlias(alias) => Some(alias.alias.table().to_string()),
            _ => None,
        };
        if let Some(name) = name
            && !reads.contains(&name)
        {
            reads.push(name);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    })?;
    Ok((plan, reads))
}

/// DataFusion has no JSON type: declare such columns as TEXT for planning and return their
/// names, so the planned schema can tag them.
fn take_json_columns(statement: &mut DFStatement) -> Vec<String> {
    let DFStatement::Statement(inner) = statement else { return Vec::new() };
    let SqlStatement::CreateTable(create) = inner.as_mut() else { return Vec::new() };
    let mut names = Vec::new();
    for column in create.columns.iter_mut() {
        if matches!(column.data_type, SqlDataType::JSON | SqlDataType::JSONB) {
            column.data_type = SqlDataType::Text;
            names.push(normalize_ident(&column.name.value, column.name.quote_style));
        }
    }
    names
}

fn tag_json_columns(schema: &Schema, json_columns: &[String]) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            let field = f.as_ref().clone();
            if json_columns.contains(f.name()) {
                let mut metadata = field.metadata().clone();
                metadata.insert(PG_TYPE_KEY.to_string(), JSON_TYPE.to_string());
                field.with_metadata(metadata)
            } else {
                field
            }
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// Whether a column holds JSON text (declared `JSON` or `JSONB`).
pub fn is_json(field: &Field) -> bool {
    field.metadata().get(PG_TYPE_KEY).is_some_and(|t| t == JSON_TYPE)
}

/// The DEFAULT expressions of a CREATE TABLE, as SQL text.
fn column_default_texts(statement: &DFStatement) -> Vec<(String, String)> {
    let DFStatement::Statement(inner) = statement else { return Vec::new() };
    let SqlStatement::CreateTable(create) = inner.as_ref() else { return Vec::new() };
    create
        .columns
        .iter()
        .filter_map(|column| {
            column.options.iter().find_map(|option| match &option.option {
                ColumnOption::Default(expr) => {
                    Some((normalize_ident(&column.name.value, column.name.quote_style), expr.to_string()))
                }
                _ => None,
            })
        })
        .collect()
}

fn normalize_ident(value: &str, quote_style: Option<char>) -> String {
    if quote_style.is_some() { value.to_string() } else { value.to_ascii_lowercase() }
}

fn object_name(name: &ObjectName) -> String {
    name.0
        .last()
        .and_then(|part| part.as_ident())
        .map(|ident| normalize_ident(&ident.value, ident.quote_style))
        .unwrap_or_else(|| name.to_string())
}

/// The leading keywords of a statement, to name an unsupported construct.
fn first_words(statement: &DFStatement) -> String {
    let text = statement.to_string();
    let words: Vec<&str> = text.split_whitespace().take(3).collect();
    words.join(" ").to_uppercase()
}

/// Finds where `name` first appears in `sql` as a whole word (1-based, in characters).
pub fn locate_word(sql: &str, name: &str) -> Option<usize> {
    let lower_sql = sql.to_lowercase();
    let lower_name = name.to_lowercase();
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut from = 0;
    while let Some(found) = lower_sql[from..].find(&lower_name) {
        let start = from + found;
        let end = start + lower_name.len();
        let before_ok = lower_sql[..start].chars().next_back().is_none_or(|c| !is_word(c));
        let after_ok = lower_sql[end..].chars().next().is_none_or(|c| !is_word(c));
        if before_ok && after_ok {
            return Some(lower_sql[..start].chars().count() + 1);
        }
        from = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_splits_statements_and_reports_positions() {
        let statements = parse("SELECT 1; SELECT 2").expect("valid SQL");
        assert_eq!(statements.len(), 2);
        let statements = parse("INSERT INTO t VALUES (1); flush; SELECT 1").expect("FLUSH among statements");
        assert!(matches!(statements[1], Statement::Flush));
        let err = parse("SELECT 1 SELECT 2").expect_err("missing semicolon");
        assert_eq!(err.position(), Some(10));
        let err = parse("SELECT 1;\nSELECT (1 +").expect_err("invalid SQL");
        assert_eq!(err.sqlstate(), "42601");
        assert!(err.position().is_some_and(|p| p > 10), "{err:?}");
    }

    #[test]
    fn locate_word_respects_word_boundaries() {
        assert_eq!(locate_word("SELECT * FROM tt, t", "t"), Some(19));
        assert_eq!(locate_word("select * from Orders", "orders"), Some(15));
        assert_eq!(locate_word("select 1", "orders"), None);
    }
}
