//! Training SVF experts: REINFORCE on task rewards (the paper's loop, with group baselines,
//! exact option expectations and the supervised ablation): rollouts, advantages, the step
//! schedule and what the metrics say. The `train.<expert>` stage that drives them is
//! `stages/train/`.

pub mod advantage;
pub mod kl;
pub mod options;
pub mod rollout;
pub mod schedule;
pub mod signal;
pub mod spec;
