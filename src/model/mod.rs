//! The base model. For now this is the `model` stage: resolve the model asset, verify its pin,
//! and record what it is, so that every later stage depends on one exact model file.

pub mod stage;
