//! The barrier the running dataflow task last passed.
//!
//! A view's operators each run on their own task and pass barriers at different moments.
//! For a model swap to take effect at one barrier in every operator (so a row is never
//! filtered with one version and scored with another), the scoring functions pick the
//! version by the barrier their task last passed, not by the wall clock. The dataflow
//! runtime runs each operator inside [`scope`] and calls [`passed`] after every barrier.

use std::cell::Cell;
use std::future::Future;

tokio::task_local! {
    static PASSED: Cell<u64>;
}

/// Runs `task` as a dataflow task that has passed no barrier yet.
pub async fn scope<F: Future>(task: F) -> F::Output {
    PASSED.scope(Cell::new(0), task).await
}

/// Records that the current dataflow task passed the barrier of `epoch`.
pub fn passed(epoch: u64) {
    let _ = PASSED.try_with(|cell| cell.set(cell.get().max(epoch)));
}

/// The last barrier the current dataflow task passed (0 before the first); `None` outside
/// a dataflow task (an ad-hoc query).
pub fn last_passed() -> Option<u64> {
    PASSED.try_with(Cell::get).ok()
}
