//! The stage graph a pipeline implies: which stages exist, what each depends on, in what order
//! they run. Stages are derived from references in the spec (an expert names its dataset, an
//! evaluation names experts), never listed by hand.

mod graph;

pub use graph::{CycleError, Graph, Stage, StageId, StageKind};
