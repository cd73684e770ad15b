//! On-policy preference training (feature `trainer`): rounds of *sample → score → train →
//! evaluate*, the setting of SimPO's and REFA's on-policy data.
//!
//! Each round, the model being tuned answers every training prompt K times
//! ([`collect_round`], batched through the key/value cache), a [`Reward`](crate::reward::Reward)
//! scores the answers, the prompts whose answers scored differently become K-way preference
//! examples on the exact tokens the model emitted, the trainer takes steps on them with any
//! loss of the crate, and [`evaluate_heldout`] measures greedy answers to held-out prompts:
//! their mean reward, length, and the probability of ending where they ended.
//! [`instruction_prompts`] builds a verifiable prompt set (topics × checkable constraints),
//! split by topic. `examples/on_policy.rs` runs the loop; `docs/experiments.md` has results.

mod evaluate;
mod prompts;
mod round;
mod train;

pub use evaluate::{evaluate_heldout, HeldOut};
pub use prompts::instruction_prompts;
pub use round::{collect_round, RoundData};
pub use train::{append_round, read_rounds, train_round, RoundRecord};
