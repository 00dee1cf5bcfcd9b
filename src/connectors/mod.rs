//! Connectors: where a source's rows come from.
//!
//! Today: the built-in generators (`nexmark` and `telemetry`), for demos, tests and
//! benchmarks. A source's rows are appended to the source's relation through the
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
