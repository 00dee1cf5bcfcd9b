//! Running model statements: training, versions, hot swaps, import/export, recovery.
//!
//! A model version is stored in two steps: its JSON file goes to
//! `models/<name>/v<N>.json` in the object store (the path is owned by [`model_path`]),
//! then a `ModelVersion` record goes to the log. Only when that record is durable does
//! the log's publish callback install the version in the registry, in log order with
//! barriers, so views switch to it at the next barrier. A statement that fails before
//! the record is durable leaves no model behind (at most an unreferenced file, which the
//! next version of that number overwrites).
//!
//! Recovery replays the model records, reads each version's file and installs them
//! before the views restart, so every view starts on its model's active version — the
//! one it was scoring with once the last swap's barrier had passed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::table::SnapshotCell;
use super::{Database, Outcome, Record, place_relation};
use crate::error::{Error, Result};
use crate::ml::model::{Model, Scorer};
use crate::ml::train::{self, Provenance, TrainingSet};
use crate::ml::udf::{models_named_in, undefined_model};
use crate::ml::{self, ModelRegistry};
use crate::sql::model::{ModelStatement, describe_model_schema, parse_interval, show_models_schema};
use crate::sql::{self, DropRelations, RelationKind};

/// The catalog's model state: the registry the scoring functions read, where model files
/// live, and the scheduled retraining.
pub struct Models {
    pub registry: Arc<ModelRegistry>,
    store: Arc<dyn ObjectStore>,
    /// Model name → the `retrain_every` its running schedule was started with.
    schedules: std::sync::Mutex<HashMap<String, String>>,
}

impl Models {
    pub fn new(store: Arc<dyn ObjectStore>) -> Models {
        Models { registry: Arc::default(), store, schedules: std::sync::Mutex::default() }
    }

    fn schedules(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        match self.schedules.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Where version `version` of model `name` is stored.
pub fn model_path(name: &str, version: u32) -> Path {
    Path::from(format!("models/{name}/v{version}.json"))
}

/// Models found while replaying the log: name → (stored versions, active version).
#[derive(Default)]
pub struct RecoveredModels {
    models: BTreeMap<String, (Vec<u32>, u32)>,
}

impl RecoveredModels {
    /// Applies a model record; returns false for records that are not about models.
    pub fn replay(&mut self, record: &Record) -> bool {
        match record {
            Record::ModelVersion { name, version } => {
                let (versions, active) = self.models.entry(name.clone()).or_default();
                if !versions.contains(version) {
                    versions.push(*version);
                }
                *active = *version;
            }
            Record::ActivateModel { name, version } => {
                if let Some((_, active)) = self.models.get_mut(name) {
                    *active = *version;
                }
            }
            Record::DropModel { name } => {
                self.models.remove(name);
            }
            _ => return false,
        }
        true
    }
}

/// The log records that recreate every model, for a snapshot.
pub fn snapshot_records(registry: &ModelRegistry) -> Vec<Record> {
    let mut records = Vec::new();
    for name in registry.names() {
        let Some(entry) = registry.get(&name) else { continue };
        for scorer in entry.versions() {
            records.push(Record::ModelVersion { name: name.clone(), version: scorer.model.version });
        }
        records.push(Record::ActivateModel { name: name.clone(), version: entry.active_version() });
    }
    records
}

fn already_exists(name: &str) -> Error {
    Error::Plan {
        code: "42710",
        message: format!("model \"{name}\" already exists; CREATE OR REPLACE MODEL trains a new version of it"),
        position: None,
    }
}

impl Database {
    /// Loads the models recovered from the log (before the views restart).
    pub(super) async fn load_models(&self, recovered: RecoveredModels) {
        let models = &self.shared.models;
        for (name, (versions, active)) in recovered.models {
            let mut loaded = 0;
            for version in versions {
                match read_version(models.store.as_ref(), &name, version).await {
                    Ok(scorer) => {
                        models.registry.install(scorer, 0);
                        loaded += 1;
                    }
                    Err(e) => tracing::error!(model = %name, version, "model version could not be loaded: {e}"),
                }
            }
            if loaded > 0 && !models.registry.set_active(&name, active, 0) {
                tracing::error!(model = %name, version = active, "the active model version is missing");
            }
            if let Some(entry) = models.registry.get(&name)
                && let Some(every) = entry.active().model.retrain_every.clone()
            {
                self.schedule_retraining(&name, Some(every));
            }
            tracing::info!(model = %name, versions = loaded, "model loaded");
        }
    }

    /// Runs a model statement.
    pub(super) async fn run_model_statement(&self, statement: ModelStatement) -> Result<Outcome> {
        let tag = statement.tag();
        match statement {
            ModelStatement::Create { name, or_replace, if_not_exists, algorithm, params, retrain_every, query } => {
                train::check_params(&name, &algorithm, &params)?;
                if self.skip_create(&name, or_replace, if_not_exists)? {
                    return Ok(Outcome::Command { tag, rows: None });
                }
                let model = self.train(&name, &algorithm, params, retrain_every, query).await?;
                self.commit_version(model, or_replace).await?;
            }
            ModelStatement::Import { name, or_replace, if_not_exists, path } => {
                if self.skip_create(&name, or_replace, if_not_exists)? {
                    return Ok(Outcome::Command { tag, rows: None });
                }
                let bytes = tokio::fs::read(&path).await.map_err(|e| Error::Plan {
                    code: "58P01",
                    message: format!("cannot read model file \"{path}\": {e}"),
                    position: None,
                })?;
                let mut model = Model::from_json(&bytes, &format!("\"{path}\""))?;
                model.name = name;
                // A schedule belongs to a deployment: an imported model is not retrained.
                model.retrain_every = None;
                self.commit_version(model, or_replace).await?;
            }
            ModelStatement::Retrain { name } => {
                self.retrain(&name).await?;
            }
            ModelStatement::SetVersion { name, version } => self.set_version(&name, version).await?,
            ModelStatement::Drop { name, if_exists, cascade } => self.drop_model(&name, if_exists, cascade).await?,
            ModelStatement::Show => return self.show_models(),
            ModelStatement::Describe { name } => return self.describe_model(&name),
            ModelStatement::Export { name, version, path } => {
                let entry = self.shared.models.registry.get(&name).ok_or_else(|| undefined_model(&name))?;
                let scorer = match version {
                    None => entry.active(),
                    Some(v) => entry
                        .versions()
                        .into_iter()
                        .find(|s| s.model.version == v)
                        .ok_or_else(|| missing_version(&name, v))?,
                };
                let bytes = scorer.model.to_json()?;
                tokio::fs::write(&path, bytes).await.map_err(|e| Error::Plan {
                    code: "58030",
                    message: format!("cannot write model file \"{path}\": {e}"),
                    position: None,
                })?;
                return Ok(Outcome::Command { tag, rows: Some(1) });
            }
        }
        Ok(Outcome::Command { tag, rows: None })
    }

    /// For CREATE: whether to do nothing (IF NOT EXISTS on an existing model); an existing
    /// model without OR REPLACE or IF NOT EXISTS is an error.
    fn skip_create(&self, name: &str, or_replace: bool, if_not_exists: bool) -> Result<bool> {
        match (self.shared.models.registry.get(name).is_some(), or_replace, if_not_exists) {
            (false, _, _) | (true, true, _) => Ok(false),
            (true, false, true) => Ok(true),
            (true, false, false) => Err(already_exists(name)),
        }
    }

    /// Runs the training query and fits the model on a blocking thread.
    async fn train(
        &self,
        name: &str,
        algorithm: &str,
        params: BTreeMap<String, String>,
        retrain_every: Option<String>,
        query: String,
    ) -> Result<Model> {
        let state = self.session_state();
        let (plan, _) = SnapshotCell::scope(self.shared.cell.committed(), sql::plan_query(&state, &query))
            .await
            .map_err(|e| place_relation(e, &query))?;
        self.check_views_healthy(&plan)?;
        let schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
        let snapshot = if self.reads_views(&plan)? { self.shared.cell.serving() } else { self.shared.cell.committed() };
        tracing::info!(model = %name, "reading training rows");
        let batches = self.collect(plan, snapshot, &query).await?;
        let version = self.shared.models.registry.get(name).map_or(1, |e| e.latest_version() + 1);
        let provenance = Provenance { name: name.to_string(), version, training_query: Some(query), retrain_every };
        let (name, algorithm) = (name.to_string(), algorithm.to_string());
        tokio::task::spawn_blocking(move || {
            let impute = params.get("impute").is_some_and(|v| v == "mean");
            let data = TrainingSet::from_batches(&name, &algorithm, &schema, &batches, impute)?;
            train::train(&algorithm, &params, &data, provenance)
        })
        .await
        .map_err(|e| Error::Internal(format!("training stopped: {e}")))?
    }

    /// Trains a new version of `name` from its active version's query and parameters.
    pub async fn retrain(&self, name: &str) -> Result<u32> {
        let active = self.shared.models.registry.get(name).ok_or_else(|| undefined_model(name))?.active();
        let model = &active.model;
        let query = model.training_query.clone().ok_or_else(|| Error::Plan {
            code: "55000",
            message: format!("model \"{name}\" was imported without a training query, so it cannot be retrained"),
            position: None,
        })?;
        let trained = self
            .train(name, model.trained.algorithm(), model.params.clone(), model.retrain_every.clone(), query)
            .await?;
        self.commit_version(trained, true).await
    }

    /// The views (materialized or plain) whose query calls a model function on `name`.
    fn model_users(&self, name: &str) -> Vec<(String, RelationKind)> {
        let uses = |query: &str| models_named_in(query).iter().any(|m| m == name || m.to_ascii_lowercase() == name);
        let mut users: Vec<(String, RelationKind)> = self
            .shared
            .views()
            .iter()
            .filter(|(_, v)| uses(&v.query))
            .map(|(n, _)| (n.clone(), RelationKind::MaterializedView))
            .collect();
        users.extend(
            self.shared
                .plain_views()
                .iter()
                .filter(|(_, v)| uses(&v.query))
                .map(|(n, _)| (n.clone(), RelationKind::View)),
        );
        users
    }

    /// Refuses a version that running views could not score with: other features or
    /// another `predict` type than the active version.
    fn check_swappable(&self, current: &Model, next: &Model) -> Result<()> {
        let Some((view, _)) = self.model_users(&current.name).into_iter().next() else { return Ok(()) };
        let same_features = current.features.len() == next.features.len();
        let same_predict = current.predict_type().ok() == next.predict_type().ok();
        if same_features && same_predict {
            return Ok(());
        }
        Err(Error::Plan {
            code: "2BP01",
            message: format!(
                "view \"{view}\" scores with model \"{}\" ({}); version {} takes ({}){}; drop the view first",
                current.name,
                current.feature_list(),
                next.version,
                next.feature_list(),
                if same_predict { "" } else { " and predicts another type" }
            ),
            position: None,
        })
    }

    /// Stores `model` as the next version of its name, makes it active and returns its
    /// version. Views switch to it at the next barrier.
    async fn commit_version(&self, mut model: Model, or_replace: bool) -> Result<u32> {
        let writer = self.shared.writer.lock().await;
        let registry = &self.shared.models.registry;
        let existing = registry.get(&model.name);
        if let Some(entry) = &existing {
            if !or_replace {
                return Err(already_exists(&model.name));
            }
            model.version = entry.latest_version() + 1;
            self.check_swappable(&entry.active().model, &model)?;
        } else {
            model.version = 1;
        }
        let scorer = Scorer::new(model)?;
        let model = &scorer.model;
        let (name, version) = (model.name.clone(), model.version);
        self.shared.models.store.put(&model_path(&name, version), model.to_json()?.into()).await?;
        let retrain_every = model.retrain_every.clone();
        let entries = vec![Record::ModelVersion { name: name.clone(), version }.entry(None)?];
        let shared = self.shared.clone();
        let publish = Box::new(move |_| {
            let last_barrier = shared.epochs.last_barrier();
            shared.models.registry.install(scorer, last_barrier);
        });
        let ack = self.shared.log.enqueue(entries, publish).await?;
        drop(writer);
        self.durable(ack).await?;
        tracing::info!(model = %name, version, "model version stored and activated");
        self.schedule_retraining(&name, retrain_every);
        Ok(version)
    }

    async fn set_version(&self, name: &str, version: u32) -> Result<()> {
        let writer = self.shared.writer.lock().await;
        let entry = self.shared.models.registry.get(name).ok_or_else(|| undefined_model(name))?;
        let target = entry
            .versions()
            .into_iter()
            .find(|s| s.model.version == version)
            .ok_or_else(|| missing_version(name, version))?;
        self.check_swappable(&entry.active().model, &target.model)?;
        let entries = vec![Record::ActivateModel { name: name.to_string(), version }.entry(None)?];
        let shared = self.shared.clone();
        let model = name.to_string();
        let publish = Box::new(move |_| {
            let last_barrier = shared.epochs.last_barrier();
            shared.models.registry.set_active(&model, version, last_barrier);
        });
        let ack = self.shared.log.enqueue(entries, publish).await?;
        drop(writer);
        self.durable(ack).await?;
        self.schedule_retraining(name, target.model.retrain_every.clone());
        Ok(())
    }

    async fn drop_model(&self, name: &str, if_exists: bool, cascade: bool) -> Result<()> {
        if self.shared.models.registry.get(name).is_none() {
            return if if_exists { Ok(()) } else { Err(undefined_model(name)) };
        }
        let users = self.model_users(name);
        if let Some((view, _)) = users.first()
            && !cascade
        {
            return Err(Error::Plan {
                code: "2BP01",
                message: format!(
                    "cannot drop model \"{name}\" because view \"{view}\" uses it; drop the view first, or add CASCADE to drop it too"
                ),
                position: None,
            });
        }
        for (view, kind) in users {
            let drop = DropRelations { kind, names: vec![view], if_exists: true, cascade: true };
            Box::pin(self.drop_relations(drop)).await?;
        }
        let writer = self.shared.writer.lock().await;
        let versions: Vec<u32> = match self.shared.models.registry.get(name) {
            Some(entry) => entry.versions().iter().map(|s| s.model.version).collect(),
            None => return Ok(()),
        };
        let entries = vec![Record::DropModel { name: name.to_string() }.entry(None)?];
        let shared = self.shared.clone();
        let model = name.to_string();
        let ack = self.shared.log.enqueue(entries, Box::new(move |_| shared.models.registry.remove(&model))).await?;
        drop(writer);
        self.durable(ack).await?;
        self.shared.models.schedules().remove(name);
        for version in versions {
            if let Err(e) = self.shared.models.store.delete(&model_path(name, version)).await {
                tracing::warn!(model = %name, version, "dropped model's file not deleted: {e}");
            }
        }
        Ok(())
    }

    /// Starts (or stops, with `None`) retraining `name` every `every`.
    fn schedule_retraining(&self, name: &str, every: Option<String>) {
        let mut schedules = self.shared.models.schedules();
        let Some(every) = every else {
            schedules.remove(name);
            return;
        };
        let Some(interval) = parse_interval(&every) else { return };
        if schedules.get(name) == Some(&every) {
            return;
        }
        schedules.insert(name.to_string(), every.clone());
        let (shared, ctx, name) = (Arc::downgrade(&self.shared), self.ctx.clone(), name.to_string());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(shared) = shared.upgrade() else { return };
                if shared.models.schedules().get(&name) != Some(&every) {
                    return;
                }
                let db = Database { ctx: ctx.clone(), shared };
                match db.retrain(&name).await {
                    Ok(version) => tracing::info!(model = %name, version, "scheduled retraining made a new version"),
                    Err(e) => {
                        tracing::warn!(model = %name, "scheduled retraining failed, the active version stays: {e}")
                    }
                }
            }
        });
    }

    fn show_models(&self) -> Result<Outcome> {
        let registry = &self.shared.models.registry;
        let entries: Vec<_> = registry.names().iter().filter_map(|n| registry.get(n)).collect();
        let actives: Vec<_> = entries.iter().map(|e| e.active()).collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(entries.iter().map(|e| e.name.clone()))),
            Arc::new(StringArray::from_iter_values(actives.iter().map(|a| a.model.trained.algorithm()))),
            Arc::new(Int64Array::from_iter_values(actives.iter().map(|a| a.model.version as i64))),
            Arc::new(Int64Array::from_iter_values(entries.iter().map(|e| e.versions().len() as i64))),
            Arc::new(StringArray::from_iter_values(actives.iter().map(|a| a.model.feature_list()))),
            Arc::new(Int64Array::from_iter_values(actives.iter().map(|a| a.model.training_rows as i64))),
            Arc::new(StringArray::from_iter_values(actives.iter().map(|a| a.model.created_at.clone()))),
            Arc::new(StringArray::from(actives.iter().map(|a| a.model.retrain_every.clone()).collect::<Vec<_>>())),
            Arc::new(Int64Array::from_iter_values(entries.iter().map(|e| count(&e.scored_rows)))),
            Arc::new(Int64Array::from_iter_values(entries.iter().map(|e| count(&e.null_scores)))),
        ];
        rows(show_models_schema(), columns)
    }

    fn describe_model(&self, name: &str) -> Result<Outcome> {
        let entry = self.shared.models.registry.get(name).ok_or_else(|| undefined_model(name))?;
        let active = entry.active_version();
        let versions: Vec<Model> = entry.versions().iter().map(|s| s.model.clone()).collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(versions.iter().map(|m| m.version as i64))),
            Arc::new(BooleanArray::from(versions.iter().map(|m| m.version == active).collect::<Vec<_>>())),
            Arc::new(StringArray::from_iter_values(versions.iter().map(|m| m.trained.algorithm()))),
            Arc::new(StringArray::from_iter_values(versions.iter().map(|m| json(&m.params)))),
            Arc::new(StringArray::from_iter_values(versions.iter().map(|m| m.feature_list()))),
            Arc::new(StringArray::from(
                versions
                    .iter()
                    .map(|m| m.label.as_ref().map(|l| format!("{} {}", l.name, l.sql_type)))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(versions.iter().map(|m| m.training_query.clone()).collect::<Vec<_>>())),
            Arc::new(Int64Array::from_iter_values(versions.iter().map(|m| m.training_rows as i64))),
            Arc::new(StringArray::from_iter_values(versions.iter().map(|m| json(&m.metrics)))),
            Arc::new(StringArray::from_iter_values(versions.iter().map(|m| m.created_at.clone()))),
            Arc::new(StringArray::from(versions.iter().map(|m| m.retrain_every.clone()).collect::<Vec<_>>())),
            Arc::new(Int64Array::from_iter_values(versions.iter().map(|_| count(&entry.null_scores)))),
        ];
        rows(describe_model_schema(), columns)
    }
}

/// A map as JSON text, for DESCRIBE's params and metrics columns.
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn count(counter: &std::sync::atomic::AtomicU64) -> i64 {
    counter.load(std::sync::atomic::Ordering::Relaxed) as i64
}

fn rows(schema: SchemaRef, columns: Vec<ArrayRef>) -> Result<Outcome> {
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let stream = RecordBatchStreamAdapter::new(schema.clone(), futures::stream::iter([Ok(batch)]));
    Ok(Outcome::Rows { schema, stream: Box::pin(stream) })
}

fn missing_version(name: &str, version: u32) -> Error {
    Error::Plan {
        code: "42704",
        message: format!("model \"{name}\" has no version {version}; DESCRIBE MODEL {name} lists its versions"),
        position: None,
    }
}

async fn read_version(store: &dyn ObjectStore, name: &str, version: u32) -> Result<Scorer> {
    let path = model_path(name, version);
    let bytes = store.get(&path).await?.bytes().await?;
    let model = Model::from_json(&bytes, path.as_ref())?;
    Scorer::new(model)
}

/// Registers the model functions on a session.
pub fn register_functions(ctx: &datafusion::prelude::SessionContext, registry: &Arc<ModelRegistry>) {
    for function in ml::udf::functions(registry) {
        ctx.register_udf(function);
    }
}
