//! Two-pass adaptation: a first pass looks at the input and picks an expert, the second answers
//! with it. This version has the prompt-based classifier (`classify.rs`, behind `tsq classify`)
//! so templates can be written and tuned; the adaptation stage and strategies come next.

pub mod classify;
