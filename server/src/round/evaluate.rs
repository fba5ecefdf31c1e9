//! The server's own evaluation of global models: on the test set after every round, and on
//! its validation split when a strategy tunes on data. burn's CPU backend, off the async runtime.

use std::sync::Arc;

use burn::tensor::Device;
use canopy_core::data::Dataset;
use canopy_core::model::state::ModelState;
use canopy_core::train::{Eval, evaluate};

/// Loss and accuracy of `model` on `data`, on a blocking thread.
/// Without a test set (a run on the tabs' own data) there is no such figure: both are NaN,
/// which the records write as NaN and the JSON as null, never a made-up number.
pub async fn on(model: &ModelState, data: &Arc<Dataset>) -> Result<Eval, String> {
    if data.is_empty() {
        return Ok(Eval {
            loss: f32::NAN,
            accuracy: f32::NAN,
            samples: 0,
        });
    }
    let (arch, params, data) = (model.arch.clone(), model.masked_params(), data.clone());
    tokio::task::spawn_blocking(move || {
        pollster::block_on(evaluate(&arch, &params, &data, &Device::flex()))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
}

/// A synchronous evaluator for strategies (called from within their aggregation, which already
/// runs off the async runtime). An empty split is an error, not a loss of 0.
pub fn validator(data: Arc<Dataset>) -> impl Fn(&ModelState) -> Result<Eval, String> {
    move |m: &ModelState| {
        if data.is_empty() {
            return Err("the server's validation split is empty (data.validation)".into());
        }
        pollster::block_on(evaluate(
            &m.arch,
            &m.masked_params(),
            &data,
            &Device::flex(),
        ))
        .map_err(|e| format!("validation failed: {e}"))
    }
}
