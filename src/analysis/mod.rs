//! Experiment tools beside the training library (cargo feature `trainer`): PNG plots of
//! training curves with a built-in bitmap font, and the URSLA probe (paper Table 2: does the
//! per-token negative log-likelihood fall with the response's length?). They serve the
//! examples and the experiments in `docs/experiments.md`; nothing in the losses or the
//! trainer depends on them.

mod plot;
mod ursla;

pub use plot::{plot_history, render_png, Panel, Series};
pub use ursla::{length_buckets, response_nll, LengthBucket};
