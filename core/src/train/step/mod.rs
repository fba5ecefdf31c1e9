//! The pluggable part of local training, as a typed part of every task ([`Step`]).
//!
//! The loop in [`crate::train`] is the same for every method: batches, forward, loss, backward,
//! optimizer step, progress. Three things vary and are chosen here:
//! - **what is learned** ([`Learn`]) and how the forward pass gets its weights from it (a
//!   [`Reparam`], in the spirit of burn's `Reparameterization`): the weights themselves; the
//!   weights under a mask (pruned entries held at exactly zero after every step); or real-valued
//!   scores over the frozen weights of a supermask model (`scores.rs`, HideNseek's signs and the
//!   binary supermask's keep bits). A method that learns something else adds a variant, its
//!   `Reparam` and its [`Learner`];
//! - **where the loss comes from** ([`LossSource`]): the client's own labels, or the server, which
//!   receives the output of the layers the client runs and answers with the gradient (the echo
//!   strategy with the whole model; split learning with a front);
//! - **what the loss gains besides** ([`Penalty`], `penalty.rs`): nothing, or FedProx's proximal
//!   term μ/2·‖w − w₀‖² towards where the task started.
//!
//! What a client keeps between tasks for what it learns (a supermask's own scores, say) is a
//! [`Learner`], one per kind of [`Learn`], held in the client's [`Learners`]: the client runtime
//! asks it where training starts and hands it the result, knowing no method.

mod loss;
mod penalty;
mod scores;
mod weights;

use std::borrow::Cow;
use std::mem::Discriminant;

use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub(crate) use loss::{BatchLoss, LossValue, batch_loss, cross_entropy};
pub(crate) use penalty::Anchor;
pub use penalty::Penalty;

use crate::model::Net;
use crate::model::arch::Arch;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub learn: Learn,
    pub loss: LossSource,
    #[serde(default)]
    pub penalty: Penalty,
}

impl Step {
    /// Layers the client runs: all of them, or the front up to a remote loss's cut.
    pub fn layers(&self, arch: &Arch) -> Result<std::ops::Range<usize>, String> {
        match self.loss {
            LossSource::Local => Ok(0..arch.layers.len()),
            LossSource::Remote { keep, .. } if !(keep > 0.0 && keep <= 1.0) => Err(format!(
                "activation dropout keeps {keep}: must be in (0, 1]"
            )),
            LossSource::Remote { cut, .. } if (1..=arch.layers.len()).contains(&(cut as usize)) => {
                Ok(0..cut as usize)
            }
            LossSource::Remote { cut, .. } => Err(format!(
                "cut {cut} outside the model's {} layers",
                arch.layers.len()
            )),
        }
    }
}

/// What the optimizer updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Learn {
    /// The weights themselves; with the task's mask, pruned entries stay exactly zero.
    #[default]
    Weights,
    /// Real-valued scores over the frozen weights of a supermask model: the forward pass uses
    /// |θ₀| ⊙ M ⊙ sign(s) (sign supermask) or θ₀ ⊙ M ⊙ [s > 0] (binary supermask), and the
    /// backward pass goes straight through the sign or threshold to the scores. What a
    /// client's scores keep from one task to the next is `personal` ([`Personal`]).
    Scores { personal: Personal },
}

/// What a client's supermask scores keep from one task to the next (its first task always
/// starts from |θ₀| signed by the task's bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Personal {
    /// Nothing: every task starts from |θ₀| with the task's bits (the global model).
    None,
    /// The magnitudes, with the task's bits as signs. Where the client disagreed with the
    /// vote its largest scores start against it, so its model stays the global one; when the
    /// vote has made a dead network (non-IID), nothing can move. Kept to compare.
    Magnitudes,
    /// The client's own scores, signs included: its model is its own, and the task's bits
    /// matter only for its first task (no federation for a returning client).
    Own,
    /// The client's own scores plus the task's sign at |θ₀| (s + b·|θ₀|, b = ±1): the global
    /// sign wins where the client's own score is weaker than its weight's initial one, the
    /// client's own sign where it learned more than that.
    OwnPlusGlobal,
}

/// What a supermask's bit means for its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SupermaskKind {
    /// HideNseek: weight = |θ₀| × (bit ? +1 : −1).
    Sign,
    /// Binary supermask (FedPM's family): weight = θ₀ × bit.
    Keep,
}

/// The frozen side of a supermask task: what the scores act on.
#[derive(Clone, Copy, Debug)]
pub struct Frozen<'a> {
    pub kind: SupermaskKind,
    pub theta0: &'a [f32],
}

/// Where each batch's loss comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum LossSource {
    /// Cross-entropy on the client's own labels.
    #[default]
    Local,
    /// The client runs layers `..cut` and sends their output with the labels; the server
    /// answers with the loss and its gradient at the cut, which the client back-propagates.
    /// One request per batch, awaited within the task (`cut` = every layer: the server
    /// computes only the loss). With `keep` < 1 the client sends a random fraction `keep` of
    /// its output values (activation dropout, see [`crate::codec::exchange`]).
    Remote { cut: u32, keep: f32 },
}

/// How the forward pass gets its weights from the learned tensors, and what happens to the
/// learned tensors after each optimizer step.
pub trait Reparam {
    /// The weights the forward pass uses, differentiable in the learned tensors.
    fn weights(&self, learned: &Net) -> Vec<Tensor<1>>;
    /// Called after every optimizer step (a mask is re-applied here).
    fn after_step(&self, learned: Net) -> Net {
        learned
    }
}

/// The reparameterisation for `learn` on this task's mask (and frozen weights, for scores).
pub(crate) fn reparam(
    learn: Learn,
    arch: &Arch,
    mask: Option<&[bool]>,
    frozen: Option<Frozen>,
    device: &Device,
) -> Result<Box<dyn Reparam>, String> {
    Ok(match (learn, mask, frozen) {
        (Learn::Weights, None, _) => Box::new(weights::Plain),
        (Learn::Weights, Some(m), _) => Box::new(weights::Masked::new(arch, m, device)),
        (Learn::Scores { .. }, _, Some(f)) => Box::new(scores::Scores::new(arch, f, mask, device)),
        (Learn::Scores { .. }, _, None) => {
            return Err("learning scores needs a supermask model (frozen weights)".into());
        }
    })
}

/// What a task's model offers a learner: the weights it computes with, its mask and, for a
/// supermask model, the frozen weights with the task's bits (in kept order).
#[derive(Clone, Copy, Debug)]
pub struct Given<'a> {
    pub params: &'a [f32],
    pub mask: Option<&'a [bool]>,
    pub supermask: Option<(Frozen<'a>, &'a [bool])>,
}

/// Where the training loop starts: the values of what it learns, and the frozen weights they
/// act on (none when the weights themselves are learned).
pub struct Start<'a> {
    pub learned: Cow<'a, [f32]>,
    pub frozen: Option<Frozen<'a>>,
}

/// A client's state for one kind of learning, kept from task to task (in the spirit of
/// Flower's client `Context.state`).
pub trait Learner: Send {
    /// What the training loop learns from for this task, out of the task's model and what this
    /// client kept.
    fn start<'a>(&mut self, learn: Learn, given: Given<'a>) -> Result<Start<'a>, String>;
    /// Takes back the learned values after training, keeps what it should, and returns the
    /// weights the trained model computes with (what is measured and uploaded).
    fn finish(&mut self, given: Given, learned: Vec<f32>) -> Vec<f32>;
}

/// A client's learners, one per kind of [`Learn`] (its parameters aside), each made on the
/// first task that needs it and kept for the ones after.
#[derive(Default)]
pub struct Learners(Vec<(Discriminant<Learn>, Box<dyn Learner>)>);

impl Learners {
    /// The learner for `learn`, made now if this client has none yet.
    pub fn get(&mut self, learn: Learn) -> &mut dyn Learner {
        let kind = std::mem::discriminant(&learn);
        let at = match self.0.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                self.0.push((kind, learner(learn)));
                self.0.len() - 1
            }
        };
        self.0[at].1.as_mut()
    }
}

/// A fresh learner for `learn`, with nothing kept yet.
fn learner(learn: Learn) -> Box<dyn Learner> {
    match learn {
        Learn::Weights => Box::new(weights::Weights),
        Learn::Scores { .. } => Box::new(scores::OwnScores::default()),
    }
}
