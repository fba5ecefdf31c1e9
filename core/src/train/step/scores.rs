//! Learning scores over frozen weights (supermasks): the weights never change; the sign or the
//! keep-bit of each score decides how its weight enters the model.

use burn::tensor::{Device, Tensor, TensorData};

use super::{Frozen, Reparam, SupermaskKind};
use crate::model::Net;
use crate::model::arch::Arch;

pub struct Scores {
    kind: SupermaskKind,
    /// Per tensor: |θ₀| ⊙ M (sign) or θ₀ ⊙ M (keep), constants.
    base: Vec<Tensor<1>>,
}

impl Scores {
    pub fn new(arch: &Arch, frozen: Frozen, mask: Option<&[bool]>, device: &Device) -> Scores {
        let base = arch
            .params()
            .iter()
            .map(|p| {
                let v: Vec<f32> = (p.offset..p.offset + p.len)
                    .map(|i| {
                        let kept = mask.is_none_or(|m| m[i]) as u8 as f32;
                        kept * match frozen.kind {
                            SupermaskKind::Sign => frozen.theta0[i].abs(),
                            SupermaskKind::Keep => frozen.theta0[i],
                        }
                    })
                    .collect();
                Tensor::from_data(TensorData::new(v, [p.len]), device)
            })
            .collect();
        Scores {
            kind: frozen.kind,
            base,
        }
    }
}

impl Reparam for Scores {
    fn weights(&self, learned: &Net) -> Vec<Tensor<1>> {
        learned
            .params
            .iter()
            .zip(&self.base)
            .map(|(s, base)| {
                let s = s.val();
                // One comparison either way (burn's `sign()` costs several passes on the CPU
                // backends); a score of exactly zero counts as negative.
                let positive = s.clone().greater_elem(0.0).float();
                let hard = match self.kind {
                    SupermaskKind::Sign => positive * 2.0 - 1.0,
                    SupermaskKind::Keep => positive,
                };
                // Straight-through: the forward pass sees `hard`, the gradient reaches `s` as if
                // the sign (or threshold) were the identity.
                let ste = (hard - s.clone()).detach() + s;
                base.clone() * ste
            })
            .collect()
    }
}
