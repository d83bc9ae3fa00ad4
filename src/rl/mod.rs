//! Training SVF experts: REINFORCE on task rewards (the paper's loop, with group baselines,
//! exact option expectations and the supervised ablation), resumable, as the `train.<expert>`
//! stage.

pub mod advantage;
pub mod kl;
pub mod options;
pub mod rollout;
pub mod spec;
pub mod stage;
