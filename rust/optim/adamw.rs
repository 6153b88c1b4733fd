//! AdamW (Loshchilov & Hutter): decoupled weight decay, bias-corrected moments, one pass over
//! memory per tensor, every tensor of a parameter group in one parallel call.

use half::bf16;
use rayon::prelude::*;

use crate::linalg::simd::vectorized;

/// Hyper-parameters of one AdamW step (the same for every tensor of a group).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// The step number being taken, starting at 1 (for bias correction).
    pub step: u64,
}

/// Why an AdamW call was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdamWError {
    #[error("tensor {index}: {what} has {got} elements but the parameter has {expected}")]
    LengthMismatch {
        index: usize,
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("step must be at least 1, got 0")]
    StepZero,
    #[error("{name} must be {rule}, got {value}")]
    BadHyperParameter {
        name: &'static str,
        rule: &'static str,
        value: f32,
    },
}

impl AdamW {
    fn validate(&self) -> Result<(), AdamWError> {
        let checks = [
            ("lr", self.lr >= 0.0, "non-negative", self.lr),
            (
                "beta1",
                (0.0..1.0).contains(&self.beta1),
                "in [0, 1)",
                self.beta1,
            ),
            (
                "beta2",
                (0.0..1.0).contains(&self.beta2),
                "in [0, 1)",
                self.beta2,
            ),
            ("eps", self.eps > 0.0, "positive", self.eps),
            (
                "weight_decay",
                self.weight_decay >= 0.0,
                "non-negative",
                self.weight_decay,
            ),
        ];
        for (name, ok, rule, value) in checks {
            if !ok {
                return Err(AdamWError::BadHyperParameter { name, rule, value });
            }
        }
        if self.step == 0 {
            return Err(AdamWError::StepZero);
        }
        Ok(())
    }

    /// The step's constants: `(step_size, 1/sqrt(bc2), decay)`.
    fn constants(&self) -> (f32, f32, f32) {
        let bc1 = 1.0 - (self.beta1 as f64).powi(self.step.min(i32::MAX as u64) as i32) as f32;
        let bc2 = 1.0 - (self.beta2 as f64).powi(self.step.min(i32::MAX as u64) as i32) as f32;
        (
            self.lr / bc1,
            1.0 / bc2.sqrt(),
            1.0 - self.lr * self.weight_decay,
        )
    }

    /// Updates one tensor in place: `m`, `v` moments and the parameter `p`.
    pub fn update(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let (step_size, inv_sqrt_bc2, decay) = self.constants();
        vectorized(
            #[inline(always)]
            || {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let denom = v.sqrt() * inv_sqrt_bc2 + eps;
                    *p = *p * decay - step_size * *m / denom;
                }
            },
        )
    }

    /// As [`update`](Self::update) for an f32 master `p`, and in the same pass writes the
    /// updated value rounded to bf16 (nearest even) into its compute copy `copy`.
    pub fn update_with_copy(
        &self,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        copy: &mut [bf16],
    ) {
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let (step_size, inv_sqrt_bc2, decay) = self.constants();
        vectorized(
            #[inline(always)]
            || {
                let state = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
                for ((((p, &g), m), v), c) in state.zip(copy.iter_mut()) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let denom = v.sqrt() * inv_sqrt_bc2 + eps;
                    *p = *p * decay - step_size * *m / denom;
                    *c = bf16::from_f32(*p);
                }
            },
        )
    }
}

/// One parameter tensor with its gradient and moment buffers.
pub struct Slot<'a> {
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    /// The parameter's bf16 compute copy, rewritten from the updated master in the same pass
    /// (`None`: no copy).
    pub compute_copy: Option<&'a mut [bf16]>,
}

/// Elements per parallel task: large enough to amortise scheduling, small enough to
/// balance one big tensor across cores.
const CHUNK: usize = 1 << 15;

/// Applies one AdamW step to every slot, in parallel over chunks of all tensors.
pub fn adamw_step(hp: &AdamW, slots: &mut [Slot<'_>]) -> Result<(), AdamWError> {
    hp.validate()?;
    for (index, s) in slots.iter().enumerate() {
        let n = s.param.len();
        for (what, got) in [
            ("grad", s.grad.len()),
            ("exp_avg", s.exp_avg.len()),
            ("exp_avg_sq", s.exp_avg_sq.len()),
            (
                "compute_copy",
                s.compute_copy.as_ref().map_or(n, |c| c.len()),
            ),
        ] {
            if got != n {
                return Err(AdamWError::LengthMismatch {
                    index,
                    what,
                    expected: n,
                    got,
                });
            }
        }
    }
    let mut tasks: Vec<Slot<'_>> = Vec::new();
    for s in slots.iter_mut() {
        let chunks = s
            .param
            .chunks_mut(CHUNK)
            .zip(s.grad.chunks(CHUNK))
            .zip(s.exp_avg.chunks_mut(CHUNK))
            .zip(s.exp_avg_sq.chunks_mut(CHUNK));
        let mut copies = s.compute_copy.as_deref_mut().map(|c| c.chunks_mut(CHUNK));
        for (((param, grad), exp_avg), exp_avg_sq) in chunks {
            tasks.push(Slot {
                param,
                grad,
                exp_avg,
                exp_avg_sq,
                compute_copy: copies.as_mut().and_then(|c| c.next()),
            });
        }
    }
    tasks.into_par_iter().for_each(|s| match s.compute_copy {
        Some(copy) => hp.update_with_copy(s.param, s.grad, s.exp_avg, s.exp_avg_sq, copy),
        None => hp.update(s.param, s.grad, s.exp_avg, s.exp_avg_sq),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(hp: &AdamW, p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64]) {
        let t = hp.step as i32;
        for i in 0..p.len() {
            p[i] *= 1.0 - hp.lr as f64 * hp.weight_decay as f64;
            m[i] = hp.beta1 as f64 * m[i] + (1.0 - hp.beta1 as f64) * g[i];
            v[i] = hp.beta2 as f64 * v[i] + (1.0 - hp.beta2 as f64) * g[i] * g[i];
            let mhat = m[i] / (1.0 - (hp.beta1 as f64).powi(t));
            let vhat = v[i] / (1.0 - (hp.beta2 as f64).powi(t));
            p[i] -= hp.lr as f64 * mhat / (vhat.sqrt() + hp.eps as f64);
        }
    }

    #[test]
    fn matches_the_textbook_update_over_several_steps() {
        let n = 70_000; // spans several chunks
        let mut p: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let mut m = vec![0.0f32; n];
        let mut v = vec![0.0f32; n];
        let mut pr: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let mut mr = vec![0.0f64; n];
        let mut vr = vec![0.0f64; n];
        for step in 1..=5u64 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i as f32) * 0.11 + step as f32).cos())
                .collect();
            let gr: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            let hp = AdamW {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
            };
            let mut slots = [Slot {
                param: &mut p,
                grad: &g,
                exp_avg: &mut m,
                exp_avg_sq: &mut v,
                compute_copy: None,
            }];
            adamw_step(&hp, &mut slots).unwrap();
            reference(&hp, &mut pr, &gr, &mut mr, &mut vr);
        }
        let worst = p
            .iter()
            .zip(&pr)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "max deviation {worst}");
    }

    #[test]
    fn refuses_mismatched_lengths_and_bad_hyper_parameters() {
        let (mut p, g, mut m, mut v) = (
            vec![0.0f32; 4],
            vec![0.0f32; 3],
            vec![0.0f32; 4],
            vec![0.0f32; 4],
        );
        let hp = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        };
        let mut slots = [Slot {
            param: &mut p,
            grad: &g,
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            compute_copy: None,
        }];
        let err = adamw_step(&hp, &mut slots).unwrap_err();
        assert_eq!(
            err,
            AdamWError::LengthMismatch {
                index: 0,
                what: "grad",
                expected: 4,
                got: 3
            }
        );
        let bad = AdamW { lr: -1.0, ..hp };
        assert!(matches!(
            adamw_step(&bad, &mut []),
            Err(AdamWError::BadHyperParameter { name: "lr", .. })
        ));
        let zero = AdamW { step: 0, ..hp };
        assert_eq!(adamw_step(&zero, &mut []), Err(AdamWError::StepZero));
    }

    #[test]
    fn compute_copy_is_the_updated_master_rounded_to_bf16() {
        let hp = AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 3,
        };
        let n = CHUNK + 1000; // two chunks, the second ragged
        let g: Vec<f32> = (0..n).map(|i| ((i % 23) as f32 - 11.0) / 7.0).collect();
        let init: Vec<f32> = (0..n).map(|i| ((i % 31) as f32 - 15.0) / 9.0).collect();
        let (mut p1, mut m1, mut v1) = (init.clone(), vec![0.1f32; n], vec![0.2f32; n]);
        let (mut p2, mut m2, mut v2) = (init, vec![0.1f32; n], vec![0.2f32; n]);
        let mut copy = vec![bf16::NAN; n];
        let mut with = [Slot {
            param: &mut p1,
            grad: &g,
            exp_avg: &mut m1,
            exp_avg_sq: &mut v1,
            compute_copy: Some(&mut copy),
        }];
        adamw_step(&hp, &mut with).unwrap();
        let mut without = [Slot {
            param: &mut p2,
            grad: &g,
            exp_avg: &mut m2,
            exp_avg_sq: &mut v2,
            compute_copy: None,
        }];
        adamw_step(&hp, &mut without).unwrap();
        assert_eq!(p1, p2, "the master update does not change with a copy");
        assert_eq!((m1, v1), (m2, v2));
        for (i, (c, p)) in copy.iter().zip(&p1).enumerate() {
            assert_eq!(*c, bf16::from_f32(*p), "[{i}]");
        }
        let mut short = vec![bf16::ZERO; 3];
        let (mut p, mut m, mut v) = (vec![0.0f32; 4], vec![0.0f32; 4], vec![0.0f32; 4]);
        let err = adamw_step(
            &hp,
            &mut [Slot {
                param: &mut p,
                grad: &[0.0; 4],
                exp_avg: &mut m,
                exp_avg_sq: &mut v,
                compute_copy: Some(&mut short),
            }],
        )
        .unwrap_err();
        assert!(matches!(
            err,
            AdamWError::LengthMismatch {
                what: "compute_copy",
                ..
            }
        ));
    }
}
