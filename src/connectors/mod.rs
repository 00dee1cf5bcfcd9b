//! Connectors: where a source's rows come from.
//!
//! Today: the built-in generators (`nexmark` and `telemetry`), for demos, tests and
//! benchmarks; `http` (records posted to `/ingest/<source>`, decoded here from JSON
//! lines or CSV); and `file` (local files matching a glob: CSV, JSON lines or Parquet).
//! A source's rows are appended to the source's relation through the
//! write-ahead log, together with the generator's position, so a restart resumes exactly
//! after the last durable event: nothing is lost and nothing is generated twice.

pub mod generator;

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// A source's `WITH (…)` options, by lower-case name.
pub type Options = BTreeMap<String, String>;

/// An invalid or unknown connector option.
pub fn option_error(message: impl Into<String>) -> Error {
    Error::InvalidValue { code: "22023", message: message.into() }
}

/// Reads option `name` as a number, if given.
fn number<T: std::str::FromStr>(options: &Options, name: &str) -> Result<Option<T>> {
    options
        .get(name)
        .map(|v| {
            v.trim().parse::<T>().map_err(|_| option_error(format!("option {name} = '{v}' is not a valid number")))
        })
        .transpose()
}

/// How a connector's records are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// Comma-separated values, with or without a header line.
    Csv { header: bool },
    /// Parquet files (file sources only); columns are matched by name.
    Parquet,
}

/// What a source's options describe.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectorSpec {
    /// A built-in generator: its own columns, rows appended by an ingest task.
    Generator(generator::GeneratorSpec),
    /// `POST /ingest/<source>` on the HTTP listener: records in the body, in `format`.
    Http { format: Format },
    /// Files matching `path` (a glob), each read whole; with `watch`, new files are picked
    /// up as they appear.
    File { path: String, format: Format, watch: bool },
}

/// The column a file source adds: the file each row came from. Files are appended whole,
/// so the files a source has read are the distinct values of this column.
pub const FILE_COLUMN: &str = "_file";

impl ConnectorSpec {
    /// Parses a source's options; `declared` is whether the source lists its columns.
    pub fn from_options(options: &Options, declared: bool) -> Result<ConnectorSpec> {
        if let Some(generator) = generator::GeneratorSpec::from_options(options)? {
            if declared {
                let connector = options.get("connector").cloned().unwrap_or_default();
                return Err(option_error(format!(
                    "the {connector} connector defines its own columns; leave out the column list"
                )));
            }
            return Ok(ConnectorSpec::Generator(generator));
        }
        match options.get("connector").map(|c| c.to_ascii_lowercase()).as_deref() {
            None => {
                Err(option_error("CREATE SOURCE needs WITH (connector = '…'); available: nexmark, telemetry, http"))
            }
            Some("http") => {
                if !declared {
                    return Err(option_error("an http source needs its columns: CREATE SOURCE name (col TYPE, …)"));
                }
                let known = ["connector", "format", "header"];
                if let Some(unknown) = options.keys().find(|k| !known.contains(&k.as_str())) {
                    return Err(option_error(format!(
                        "option {unknown} is unknown for the http connector (known: format, header)"
                    )));
                }
                Ok(ConnectorSpec::Http { format: format(options)? })
            }
            Some("file") => {
                if !declared {
                    return Err(option_error("a file source needs its columns: CREATE SOURCE name (col TYPE, …)"));
                }
                let known = ["connector", "format", "header", "path", "watch"];
                if let Some(unknown) = options.keys().find(|k| !known.contains(&k.as_str())) {
                    return Err(option_error(format!(
                        "option {unknown} is unknown for the file connector (known: path, format, header, watch)"
                    )));
                }
                let path =
                    options.get("path").cloned().ok_or_else(|| option_error("a file source needs path = '…'"))?;
                if path.contains("://") && !path.starts_with("file://") {
                    return Err(Error::NotSupported {
                        feature: format!("file sources at {path}"),
                        hint: Some("file sources read local paths (globs allowed) for now".into()),
                    });
                }
                let path = path.trim_start_matches("file://").to_string();
                glob::Pattern::new(&path)
                    .map_err(|e| option_error(format!("path = '{path}' is not a valid glob: {e}")))?;
                let watch = match options.get("watch").map(|w| w.to_ascii_lowercase()).as_deref() {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(other) => return Err(option_error(format!("watch = '{other}' must be 'true' or 'false'"))),
                };
                Ok(ConnectorSpec::File { path, format: format(options)?, watch })
            }
            Some(other) => Err(Error::NotSupported {
                feature: format!("the {other} connector"),
                hint: Some("connectors available today: nexmark, telemetry, http, file".into()),
            }),
        }
    }
}

/// `FORMAT JSON | CSV` (default JSON), with `header = 'true'` for CSV.
fn format(options: &Options) -> Result<Format> {
    let header = match options.get("header").map(|h| h.to_ascii_lowercase()).as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(option_error(format!("header = '{other}' must be 'true' or 'false'"))),
    };
    match options.get("format").map(|f| f.to_ascii_lowercase()).as_deref() {
        None | Some("json") => Ok(Format::Json),
        Some("csv") => Ok(Format::Csv { header }),
        Some("parquet") if options.get("connector").is_some_and(|c| c.eq_ignore_ascii_case("file")) => {
            Ok(Format::Parquet)
        }
        Some(other) => Err(Error::NotSupported {
            feature: format!("FORMAT {}", other.to_ascii_uppercase()),
            hint: Some("formats available today: JSON (one object per line), CSV, and Parquet for files".into()),
        }),
    }
}

/// JSON lines decoded together (a failing chunk is decoded line by line to name the line).
const JSON_CHUNK: usize = 4096;

/// Decodes `body` into rows of `schema`. A record that does not fit fails the whole body,
/// with its line number and what is wrong, so nothing is half ingested.
pub fn decode(
    format: Format,
    schema: &datafusion::arrow::datatypes::SchemaRef,
    body: &[u8],
) -> Result<Vec<datafusion::arrow::record_batch::RecordBatch>> {
    use datafusion::arrow::csv::ReaderBuilder as CsvReader;
    use datafusion::arrow::json::ReaderBuilder as JsonReader;
    let bad = |line: usize, e: &dyn std::fmt::Display| Error::InvalidValue {
        code: "22P02",
        message: if line == 0 { format!("invalid Parquet file: {e}") } else { format!("line {line}: {e}") },
    };
    match format {
        Format::Json => {
            let lines: Vec<(usize, &[u8])> = body
                .split(|b| *b == b'\n')
                .enumerate()
                .filter(|(_, line)| !line.iter().all(|b| b.is_ascii_whitespace()))
                .map(|(i, line)| (i + 1, line))
                .collect();
            let mut batches = Vec::new();
            for chunk in lines.chunks(JSON_CHUNK) {
                let mut decoder = JsonReader::new(schema.clone()).with_strict_mode(true).build_decoder()?;
                let decoded = chunk.iter().try_for_each(|(_, line)| decoder.decode(line).map(|_| ()));
                match decoded.and_then(|_| decoder.flush()) {
                    Ok(batch) => batches.extend(batch),
                    Err(_) => {
                        // Find the offending line: decode the chunk's lines one by one.
                        for (number, line) in chunk {
                            let mut single = JsonReader::new(schema.clone()).with_strict_mode(true).build_decoder()?;
                            single.decode(line).and_then(|_| single.flush()).map_err(|e| bad(*number, &e))?;
                        }
                        return Err(Error::Internal("a JSON chunk failed but none of its lines did".into()));
                    }
                }
            }
            Ok(batches)
        }
        Format::Parquet => {
            use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(body))
                .map_err(|e| bad(0, &e))?
                .build()
                .map_err(|e| bad(0, &e))?;
            let mut batches = Vec::new();
            for batch in reader {
                let batch = batch.map_err(|e| bad(0, &e))?;
                // Columns by name, cast to the declared types.
                let mut columns = Vec::with_capacity(schema.fields().len());
                for field in schema.fields() {
                    let column = batch.column_by_name(field.name()).ok_or_else(|| Error::InvalidValue {
                        code: "22P02",
                        message: format!("the Parquet file has no column \"{}\"", field.name()),
                    })?;
                    columns.push(datafusion::arrow::compute::cast(column, field.data_type())?);
                }
                batches.push(datafusion::arrow::record_batch::RecordBatch::try_new(schema.clone(), columns)?);
            }
            Ok(batches)
        }
        Format::Csv { header } => {
            let reader = CsvReader::new(schema.clone()).with_header(header).build(std::io::Cursor::new(body))?;
            let mut batches = Vec::new();
            let mut line = usize::from(header) + 1;
            for batch in reader {
                let batch = batch.map_err(|e| bad(line, &e))?;
                line += batch.num_rows();
                batches.push(batch);
            }
            Ok(batches)
        }
    }
}
