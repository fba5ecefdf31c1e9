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
        // A buffered run (`[buffered]`): its version, buffer fill, clients training, stale drops.
        "buffer": hub.buffer(),
        "elapsed_seconds": hub.elapsed_seconds(),
        // On a root: the tabs connected to its live edges (heard from within the edge timeout,
        // which the dashboard also marks late edges by).
        "connected": hub.connected() + hub.edge_connected(hub.edge_timeout()),
        "edge_timeout_ms": hub.edge_timeout().as_millis() as u64,
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use canopy_core::protocol::RunInfo;

    use super::*;
    use crate::scale::wire::Presence;

    #[test]
    fn live_edges_follow_the_configured_timeout() {
        let arch = Arch::preset("mlp", [1, 4, 4], 3).unwrap();
        let info = RunInfo {
            run_id: "r".into(),
            strategy: "fedavg".into(),
            model: "mlp".into(),
            dataset: "digits".into(),
            partition: "iid".into(),
            rounds: 1,
            classes: Vec::new(),
        };
        for (timeout_ms, connected) in [(60_000u64, 4), (1, 0)] {
            let timeout = Duration::from_millis(timeout_ms);
            let mut hub = Hub::new(info.clone(), Vec::new(), Vec::new(), false, timeout);
            hub.edge_seen(Presence {
                edge: "e1".into(),
                url: "http://e1/".into(),
                connected: 4,
                idle: Vec::new(),
                seq: 1,
                signer: String::new(),
                signature: Vec::new(),
            })
            .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let s = snapshot(&hub, &json!({}), &arch);
            assert_eq!(s["connected"], connected, "timeout {timeout_ms} ms");
            assert_eq!(s["edge_timeout_ms"], timeout_ms);
        }
    }
}
