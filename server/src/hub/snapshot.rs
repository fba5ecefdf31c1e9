//! The run's public state in one JSON value: what `/api/metrics` serves, the dashboard draws and
//! the run folder keeps as `metrics.json`.

use canopy_core::metric_keys;
use canopy_core::model::arch::{Arch, Layer};
use serde_json::json;

use super::Hub;

/// Everything the dashboard shows, and what `metrics.json` holds.
pub fn snapshot(hub: &Hub, config: &serde_json::Value, arch: &Arch) -> serde_json::Value {
    json!({
        "run": hub.info(),
        "config": config,
        "phase": hub.phase(),
        "round": hub.round(),
        "elapsed_seconds": hub.elapsed_seconds(),
        // On a root: the tabs connected to its live edges.
        "connected": hub.connected() + hub.edge_connected(std::time::Duration::from_secs(3)),
        "control": hub.control(),
        "strategies": canopy_core::strategy::names(),
        "metric_keys": metric_keys::published(),
        "model": model_summary(arch),
        "clients": hub.clients().collect::<Vec<_>>(),
        "rounds": hub.rounds(),
        "edges": hub.edges_json(),
    })
}

/// The current architecture: size, cost and the width of each prunable layer. Layer names
/// match the parameter names (`layers.3`), as strategies use them in per-layer metrics.
fn model_summary(arch: &Arch) -> serde_json::Value {
    let specs = arch.params();
    let layers: Vec<_> = arch
        .layers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let (kind, width) = match l {
                Layer::Dense { units, .. } => ("dense", *units),
                Layer::Conv { filters, .. } => ("conv", *filters),
                _ => return None,
            };
            let params: usize = specs.iter().filter(|p| p.layer == i).map(|p| p.len).sum();
            Some(json!({ "name": format!("layers.{i}"), "kind": kind, "width": width, "params": params }))
        })
        .collect();
    json!({
        "params": arch.num_params(),
        "flops_per_sample": arch.flops_per_sample(),
        "widths": arch.widths(),
        "layers": layers,
    })
}
