//! Mixing experts cheaply: a mixture is linear in α, W'(α) = U diag(s ⊙ Σ α_k e_k) Vᵀ =
//! Σ α_k W_k with W_k each expert's composed weight, so each expert is composed once
//! ([`Mixer`]) and a candidate α costs a weighted sum per target instead of an SVD product.

use candle_core::Tensor;

use super::spec::Granularity;
use crate::model::transformer::Transformer;
use crate::svd::cache::Decomposed;
use crate::svf::expert::{Expert, layer_of};

/// α as one row per expert.
pub fn rows(alpha: &[f64], experts: usize) -> Vec<Vec<f64>> {
    let per = alpha.len() / experts.max(1);
    alpha.chunks(per.max(1)).map(<[f64]>::to_vec).collect()
}

/// Each expert's composed weights, ready to be mixed.
pub struct Mixer {
    /// Per target: its name, layer, and W_k for each expert.
    targets: Vec<(String, usize, Vec<Tensor>)>,
    layers: usize,
}

impl Mixer {
    pub fn new(factors: &[Decomposed], experts: &[(String, Expert)]) -> candle_core::Result<Self> {
        let scales = experts
            .iter()
            .map(|(_, e)| e.effective_scales())
            .collect::<Result<Vec<_>, _>>()
            .map_err(candle_core::Error::wrap)?;
        let mut targets = Vec::new();
        for d in factors {
            let f = &d.factors;
            let composed = scales
                .iter()
                .map(|s| match s.get(&d.name) {
                    Some(e) => crate::svd::compose(&f.u, &(&f.s * e)?, &f.vt),
                    None => crate::svd::compose(&f.u, &f.s, &f.vt),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            targets.push((d.name.clone(), layer_of(&d.name).unwrap_or(0), composed));
        }
        let layers = targets.iter().map(|t| t.1 + 1).max().unwrap_or(1);
        Ok(Self { targets, layers })
    }

    /// How many weights each expert gets.
    pub fn groups(&self, granularity: Granularity) -> usize {
        match granularity {
            Granularity::Expert => 1,
            Granularity::Layer => self.layers,
        }
    }

    /// Sets `tf`'s targets to the mixture `alpha` (expert-major: expert k's weights are
    /// `alpha[k * groups .. (k + 1) * groups]`).
    pub fn apply(
        &self,
        tf: &mut Transformer,
        alpha: &[f64],
        granularity: Granularity,
    ) -> crate::model::error::Result<()> {
        let groups = self.groups(granularity);
        for (name, layer, composed) in &self.targets {
            let group = if groups == 1 { 0 } else { *layer };
            let mut mixed: Option<Tensor> = None;
            for (k, w) in composed.iter().enumerate() {
                let term = (w * alpha[k * groups + group])?;
                mixed = Some(match mixed {
                    Some(m) => (m + term)?,
                    None => term,
                });
            }
            if let Some(w) = mixed {
                tf.replace_weight(name, w)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svf::apply::{Application, apply};
    use crate::svf::expert::{Mix, combine};
    use crate::svf::spread_expert as expert;

    /// Mixing composed weights equals composing the combined expert (what is saved).
    #[test]
    fn mixed_weights_equal_the_combined_experts_weights() {
        let (tf, factors) = crate::svf::tiny_decomposed(21);
        let experts = vec![
            ("a".to_string(), expert(&factors, 1)),
            ("b".to_string(), expert(&factors, 2)),
        ];
        let mixer = Mixer::new(&factors, &experts).unwrap();
        let layers = mixer.groups(Granularity::Layer);
        let alpha: Vec<f64> = (0..2 * layers).map(|i| 0.1 + 0.2 * i as f64).collect();
        let mut mixed = tf.clone();
        mixer.apply(&mut mixed, &alpha, Granularity::Layer).unwrap();
        let combined = combine(&experts, &Mix::PerLayer(rows(&alpha, 2))).unwrap();
        let mut expected = tf.clone();
        apply(
            &mut expected,
            &factors,
            &combined.effective_scales().unwrap(),
            Application::Compose,
        )
        .unwrap();
        let (got, want) = (mixed.tensors().unwrap(), expected.tensors().unwrap());
        for d in &factors {
            let key = format!("{}.weight", d.name);
            let diff = (&got[&key] - &want[&key])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "{}: {diff}", d.name);
        }
    }
}
