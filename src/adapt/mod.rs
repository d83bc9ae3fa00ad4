//! Two-pass adaptation: a first pass looks at the input and picks or builds an expert, the
//! second answers with it.
//! - `classify.rs`: prompt-based classification (score or generate mode), behind `tsq classify`;
//! - `router.rs`: a routing first pass as saved by its stage and loaded by evaluation;
//! - `cem.rs`: the cross-entropy method; `few_shot.rs`: mixing weights searched with it;
//! - `stage.rs`: the `adapt.<name>` stage that prepares each strategy;
//! - `adapter.rs`: a finished run's adaptation for `tsq generate --adapt` and `tsq chat`.

pub mod adapter;
pub mod cem;
pub mod classify;
pub mod few_shot;
pub mod router;
pub mod spec;
pub mod stage;
