//! The stage graph: stages (id, kind, dependencies, config subtree), their order, cycle reports.
//! Which stages a pipeline has is declared by the stage kinds in `crate::stages`, from references
//! in the spec (an expert names its dataset, an evaluation names experts), never listed by hand.

mod graph;

pub use graph::{CycleError, Graph, Stage, StageId, dependency_order};
