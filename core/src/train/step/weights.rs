//! Learning the weights themselves, with or without a mask.

use std::borrow::Cow;

use burn::tensor::{Device, Tensor, TensorData};

use super::{Given, Learn, Learner, Reparam, Start};
use crate::model::Net;
use crate::model::arch::Arch;

pub struct Plain;

impl Reparam for Plain {
    fn weights(&self, learned: &Net) -> Vec<Tensor<1>> {
        learned.weights()
    }
}

/// Pruned entries are zeroed after every optimizer step, so momentum cannot revive them.
pub struct Masked {
    masks: Vec<Tensor<1>>,
}

impl Masked {
    pub fn new(arch: &Arch, mask: &[bool], device: &Device) -> Masked {
        let masks = arch
            .params()
            .iter()
            .map(|p| {
                let m: Vec<f32> = mask[p.offset..p.offset + p.len]
                    .iter()
                    .map(|&k| k as u8 as f32)
                    .collect();
                Tensor::from_data(TensorData::new(m, [p.len]), device)
            })
            .collect();
        Masked { masks }
    }
}

impl Reparam for Masked {
    fn weights(&self, learned: &Net) -> Vec<Tensor<1>> {
        learned.weights()
    }

    fn after_step(&self, learned: Net) -> Net {
        let params = learned
            .params
            .into_iter()
            .zip(&self.masks)
            .map(|(p, m)| p.map(|t| (t * m.clone()).detach().require_grad()))
            .collect();
        Net { params }
    }
}

/// Learning weights keeps nothing between tasks: training starts from the task's model and its
/// result is the trained model.
pub struct Weights;

impl Learner for Weights {
    fn start<'a>(&mut self, _: Learn, given: Given<'a>) -> Result<Start<'a>, String> {
        Ok(Start {
            learned: Cow::Borrowed(given.params),
            frozen: None,
        })
    }

    fn finish(&mut self, _: Given, learned: Vec<f32>) -> Vec<f32> {
        learned
    }
}
