//! Two-pass adaptation: a first pass looks at the input and picks or builds an expert, the
//! second answers with it.
//! - `classify.rs`: prompt-based classification (score or generate mode), behind `tsq classify`;
//! - `router.rs`: a routing first pass as saved by its stage and loaded by evaluation;
//! - `cem.rs`: the cross-entropy method; `mixer.rs`: experts composed once and mixed by α;
//! - `spec.rs`: adaptations as pipelines write them.
//!
//! The `adapt.<name>` stage, the few-shot search it runs and a finished run's adaptation for
//! `tsq generate --adapt` and `tsq chat` are `stages/adapt/`.

pub mod cem;
pub mod classify;
mod error;
pub mod mixer;
pub mod router;
pub mod spec;

pub use error::{AdaptError, LabelError};
