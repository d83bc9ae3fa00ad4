//! An expert's section: training curves, how strongly it rescales each matrix, and the base
//! singular values of a few targets.

use super::*;

/// An expert's training curves, and its scales and the base spectrum from its file.
pub(super) fn training(dir: &Path, expert: &str, report: &mut Report) -> Result<(), Unreadable> {
    let lines = read_lines(&dir.join("metrics.jsonl"))?;
    let steps = lines
        .iter()
        .filter_map(|l| {
            Some(TrainStep {
                step: l.get("step")?.as_u64()?,
                reward: number(l, "/rollout/reward")?,
                reward_std: number(l, "/rollout/reward_std").unwrap_or(0.0),
                kl: number(l, "/rollout/kl").unwrap_or(0.0),
                zero_std_fraction: number(l, "/rollout/frac_reward_zero_std").unwrap_or(0.0),
                tokens_per_s: number(l, "/tokens_per_s").unwrap_or(0.0),
                val_accuracy: number(l, "/val_accuracy"),
            })
        })
        .collect();
    let summary: Value = read_json(&dir.join("training.json")).unwrap_or_default();
    report.training.push(Training {
        expert: expert.to_string(),
        steps,
        kept_step: summary.get("kept_step").and_then(Value::as_u64),
        best_val_accuracy: number(&summary, "/best_val_accuracy"),
        seconds: Manifest::read(dir).map_or(0.0, |m| m.duration_s),
    });
    let file = dir.join(crate::stages::train::EXPERT_FILE);
    let loaded = crate::svf::expert::Expert::load(&file)?;
    report.experts.push(scales(expert, &loaded)?);
    if report.spectra.is_empty() {
        report.spectra = spectra(&loaded)?;
    }
    Ok(())
}

/// `layers.<i>.<module>` as (i, module).
pub(super) fn layer_and_module(target: &str) -> Option<(usize, &str)> {
    let rest = target.strip_prefix("layers.")?;
    let (layer, module) = rest.split_once('.')?;
    Some((layer.parse().ok()?, module))
}

pub(super) fn scales(
    name: &str,
    expert: &crate::svf::expert::Expert,
) -> Result<ExpertScales, Unreadable> {
    let effective = expert.effective_scales()?;
    let mut layers = BTreeSet::new();
    let mut modules = BTreeSet::new();
    let mut changes = BTreeMap::new();
    for (target, scale) in &effective {
        let Some((layer, module)) = layer_and_module(target) else {
            continue;
        };
        let rms = scale
            .affine(1.0, -1.0)
            .and_then(|d| d.sqr())
            .and_then(|d| d.mean_all())
            .and_then(|m| m.to_scalar::<f32>())?;
        layers.insert(layer);
        modules.insert(module.to_string());
        changes.insert((layer, module.to_string()), f64::from(rms).sqrt());
    }
    let (layers, modules): (Vec<usize>, Vec<String>) =
        (layers.into_iter().collect(), modules.into_iter().collect());
    let change = layers
        .iter()
        .map(|&l| {
            modules
                .iter()
                .map(|m| changes.get(&(l, m.clone())).copied())
                .collect()
        })
        .collect();
    Ok(ExpertScales {
        expert: name.to_string(),
        layers,
        modules,
        change,
    })
}

/// The base singular values of a few targets: the first, middle and last layer of the first
/// module, and the middle layer of each other module.
pub(super) fn spectra(expert: &crate::svf::expert::Expert) -> Result<Vec<Spectrum>, Unreadable> {
    let mut by_module: BTreeMap<&str, Vec<(usize, &String)>> = BTreeMap::new();
    for target in expert.vectors.keys() {
        if let Some((layer, module)) = layer_and_module(target) {
            by_module.entry(module).or_default().push((layer, target));
        }
    }
    let mut chosen = Vec::new();
    for (k, targets) in by_module.values_mut().enumerate() {
        targets.sort();
        let middle = targets[targets.len() / 2].1;
        if k == 0 {
            chosen.push(targets[0].1);
            chosen.push(middle);
            chosen.push(targets[targets.len() - 1].1);
        } else {
            chosen.push(middle);
        }
    }
    chosen.dedup();
    chosen
        .into_iter()
        .map(|target| {
            let values: Vec<f32> = expert.vectors[target].1.to_vec1()?;
            Ok(Spectrum {
                target: target.clone(),
                values: values.into_iter().map(f64::from).collect(),
            })
        })
        .collect()
}
