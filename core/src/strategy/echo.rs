//! Echo: FedAvg whose clients do not compute their own loss. For every batch a client sends its
//! model's output with the labels, and the server answers with the loss and its gradient, which
//! the client back-propagates before its optimizer step. Training is the same as FedAvg's up to
//! rounding; what it shows is the in-round exchange working end to end (tabs and native clients
//! awaiting a reply mid-task, the server answering off its round loop). Split learning takes the
//! same path with a cut inside the model.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use rand::rngs::StdRng;

use super::fedavg::NoSettings;
use super::{
    ClientView, Contribution, Exchange, RoundContext, RoundOutcome, RoundPlan, Settings, Strategy,
    StrategyConfig, UploadKind, parse_settings, plain_round, weighted_values,
};
use crate::codec::exchange;
use crate::metric_keys as keys;
use crate::model::state::ModelState;
use crate::protocol::UploadSpec;
use crate::train::step::LossSource;

pub struct Echo {
    config: StrategyConfig,
    server: Arc<LossServer>,
}

/// The server's half: cross-entropy and its gradient for each batch a client sends.
#[derive(Default)]
pub struct LossServer {
    classes: AtomicUsize,
    served: AtomicU64,
}

impl LossServer {
    pub fn for_classes(classes: usize) -> LossServer {
        LossServer {
            classes: AtomicUsize::new(classes),
            served: AtomicU64::new(0),
        }
    }
}

impl Exchange for LossServer {
    fn handle(
        &self,
        _round: u32,
        _client: u64,
        _seq: u32,
        request: &[u8],
    ) -> Result<Vec<u8>, String> {
        let classes = self.classes.load(Ordering::Relaxed);
        let batch = exchange::decode_request(request, classes)?;
        if batch.cols != classes {
            return Err(format!(
                "output has {} columns, the model {classes} classes",
                batch.cols
            ));
        }
        let (loss, grad) = exchange::cross_entropy_grad(&batch);
        self.served.fetch_add(1, Ordering::Relaxed);
        Ok(exchange::encode_reply(loss, &grad, &batch, 32, 0))
    }
}

impl Echo {
    pub fn new(config: StrategyConfig) -> Self {
        Echo {
            config,
            server: Arc::default(),
        }
    }
}

pub fn build(
    config: StrategyConfig,
    settings: Option<&Settings>,
) -> Result<Box<dyn Strategy>, String> {
    let NoSettings {} = parse_settings("echo", settings)?;
    Ok(Box::new(Echo::new(config)))
}

impl Strategy for Echo {
    fn configure_round(
        &mut self,
        round: u32,
        global: &ModelState,
        clients: &[ClientView],
        rng: &mut StdRng,
    ) -> RoundPlan {
        self.server
            .classes
            .store(global.arch.classes, Ordering::Relaxed);
        let cut = global.arch.layers.len() as u32;
        let mut tasks = plain_round(
            round,
            global,
            &self.config,
            clients,
            rng,
            UploadSpec::Weights,
        );
        for (_, t) in &mut tasks {
            t.train.step.loss = LossSource::Remote { cut, keep: 1.0 };
        }
        RoundPlan::buffered(tasks).with_exchange(self.server.clone())
    }

    fn aggregate(
        &mut self,
        _round: u32,
        global: &mut ModelState,
        results: &[Contribution],
        _ctx: &RoundContext,
    ) -> Result<RoundOutcome, String> {
        if results.iter().any(|c| c.kind != UploadKind::Weights) {
            return Err("echo expects weights".into());
        }
        global.params = weighted_values(results)?;
        let mut outcome = RoundOutcome::default();
        outcome.metrics.insert(
            keys::EXCHANGES.into(),
            self.server.served.swap(0, Ordering::Relaxed) as f64,
        );
        Ok(outcome)
    }
}
