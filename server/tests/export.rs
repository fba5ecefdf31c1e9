//! The global model taken away as safetensors: downloaded from `/api/model.safetensors` at the
//! end of a real run and written by `canopy export` from the run folder; both read back with the
//! safetensors crate give the server's model and its predictions.

use std::time::Duration;

use burn::tensor::{Device, Tensor, TensorData};
use canopy_core::model::Net;
use canopy_core::model::export::from_safetensors;
use canopy_core::model::state::ModelState;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use safetensors::SafeTensors;

mod common;
use common::runtime;

/// Logits for `n` random images.
fn logits(model: &ModelState, n: usize) -> Vec<f32> {
    let device = Device::flex();
    let [c, h, w] = model.arch.input;
    let mut rng = StdRng::seed_from_u64(11);
    let x: Vec<f32> = (0..n * c * h * w)
        .map(|_| rng.random_range(0.0..1.0))
        .collect();
    let net = Net::from_flat(&model.arch, &model.params, &device);
    let x = Tensor::<4>::from_data(TensorData::new(x, [n, c, h, w]), &device);
    pollster::block_on(canopy_core::model::read_f32(net.forward(&model.arch, x))).unwrap()
}

fn same_predictions(want: &ModelState, got: &ModelState, what: &str) {
    assert_eq!(got.arch, want.arch, "{what}");
    let (a, b) = (logits(want, 16), logits(got, 16));
    assert_eq!(a.len(), 16 * want.arch.classes);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6, "{what}: {x} vs {y}");
    }
    let argmax = |r: &[f32]| (0..r.len()).fold(0, |b, j| if r[j] > r[b] { j } else { b });
    for (x, y) in a.chunks(want.arch.classes).zip(b.chunks(want.arch.classes)) {
        assert_eq!(argmax(x), argmax(y), "{what}");
    }
}

#[test]
fn a_trained_model_downloads_and_exports_as_safetensors_with_the_same_predictions() {
    let rt = runtime();
    rt.block_on(async {
        let mut cfg = common::config("export", 2, 2, "canopy-export");
        cfg.data.max_train = 1000;
        cfg.data.max_test = 200;
        cfg.strategy.config.epochs = 1;
        let running = canopy_server::start(cfg).await.unwrap();
        let initial = running.app.global.lock().unwrap().clone();
        let url = format!("ws://{}/ws", running.addr);
        let sims = tokio::task::spawn_blocking(move || {
            canopy_server::lab::sim::run_many(&url, 2, "sim", Duration::from_secs(10))
        });
        tokio::time::timeout(Duration::from_secs(120), running.rounds)
            .await
            .expect("run finished in time")
            .unwrap();
        assert!(sims.await.unwrap().iter().all(|r| r.finished));
        let global = running.app.global.lock().unwrap().clone();
        assert_ne!(global.params, initial.params, "the run trained the model");

        // The dashboard's download.
        let (status, headers, body) = common::get(running.addr, "/api/model.safetensors").await;
        assert_eq!(status, 200);
        let disposition = common::header(&headers, "content-disposition").unwrap();
        assert!(disposition.contains("attachment") && disposition.contains("model.safetensors"));
        let file = SafeTensors::deserialize(&body).unwrap();
        let mut names = file.names();
        names.sort();
        assert_eq!(
            names,
            [
                "layers.1.bias",
                "layers.1.weight",
                "layers.3.bias",
                "layers.3.weight",
                "layers.5.bias",
                "layers.5.weight"
            ]
        );
        assert_eq!(file.tensor("layers.1.weight").unwrap().shape(), [200, 784]);
        let downloaded = from_safetensors(&body).unwrap();
        assert_eq!(downloaded.params, global.params);
        same_predictions(&global, &downloaded, "download");

        // `canopy export` from the run folder (model.bin).
        let out = running.run_dir.join("exported.safetensors");
        let cli = std::process::Command::new(env!("CARGO_BIN_EXE_canopy"))
            .arg("export")
            .arg("--run")
            .arg(&running.run_dir)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(cli.status.success(), "{cli:?}");
        let exported = from_safetensors(&std::fs::read(&out).unwrap()).unwrap();
        same_predictions(&global, &exported, "canopy export");
        // A folder without a model is an error that names the file.
        let missing = std::process::Command::new(env!("CARGO_BIN_EXE_canopy"))
            .args(["export", "--run", "/nonexistent-run", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(!missing.status.success());
        assert!(String::from_utf8_lossy(&missing.stderr).contains("model.bin"));
    });
}
