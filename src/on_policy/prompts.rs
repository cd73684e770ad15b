//! A set of verifiable instruction-following prompts (in the spirit of IFEval): topics
//! crossed with constraints an [`InstructionReward`](crate::reward::InstructionReward) can
//! check, split into training and held-out prompts by topic, so that the held-out score
//! measures whether the model learned the constraints rather than the topics.

use serde_json::json;

use crate::reward::Prompt;

/// Everyday topics, each a noun phrase an answer mentions when it is on topic.
const TOPICS: &[&str] = &[
    "the sea", "a forest", "the moon", "a desert", "a volcano", "a river", "the rain",
    "a mountain", "the wind", "a city at night", "a library", "a market", "a train station",
    "a garden", "a bakery", "a lighthouse", "a castle", "a bridge", "a museum", "an airport",
    "a school", "a hospital", "a farm", "a village", "a beach", "a lake", "an island",
    "a cave", "a glacier", "a waterfall", "the sun", "a storm", "the snow", "a rainbow",
    "the stars", "a comet", "a cat", "a dog", "an owl", "a horse", "a whale", "a bee",
    "an elephant", "a tiger", "a penguin", "a dolphin", "a butterfly", "a spider", "a bicycle",
    "a car", "a ship", "a rocket", "a clock", "a camera", "a piano", "a guitar", "a violin",
    "a book", "a letter", "a map", "a candle", "a kite", "a chair", "a window", "a door",
    "bread", "coffee", "tea", "chocolate", "an apple", "an orange", "a lemon", "soup",
    "cheese", "rice", "honey", "a festival", "a wedding", "a birthday", "a football match",
    "a concert", "a picnic", "a journey", "a dream", "friendship", "winter", "summer",
    "autumn", "spring", "the morning", "the night",
];

/// The constraint kinds of the set: the instruction's wording and the checkable constraint.
fn constraint_kinds() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        (
            "Describe {topic} in at most 12 words.",
            json!({"kind": "max_words", "n": 12}),
        ),
        (
            "Describe {topic} without using any commas.",
            json!({"kind": "no_commas"}),
        ),
        (
            "Describe {topic} using only lowercase letters.",
            json!({"kind": "lowercase"}),
        ),
        (
            "Describe {topic} in exactly 3 bullet points.",
            json!({"kind": "bullet_points", "n": 3}),
        ),
        (
            "Describe {topic} in at most 2 sentences.",
            json!({"kind": "max_sentences", "n": 2}),
        ),
    ]
}

/// Training and held-out prompts: the first `train_topics` topics (in a seeded order) with
/// every constraint kind for training, the next `heldout_topics` for evaluation. Each prompt
/// carries `constraint` and `topic` fields for the instruction checks.
///
/// Defaults used by `examples/on_policy.rs`: 60 training topics × 5 kinds = 300 prompts,
/// 25 held-out topics × 5 kinds = 125 prompts.
///
/// # Errors
/// `train_topics + heldout_topics` larger than the topic list (91).
pub fn instruction_prompts(
    seed: u64,
    train_topics: usize,
    heldout_topics: usize,
) -> crate::Result<(Vec<Prompt>, Vec<Prompt>)> {
    crate::RefaError::require(
        train_topics + heldout_topics <= TOPICS.len() && train_topics > 0 && heldout_topics > 0,
        "topics",
        train_topics + heldout_topics,
        format!("training and held-out topics each >= 1, together <= {}", TOPICS.len()),
    )?;
    let order = shuffled(TOPICS.len(), seed);
    let prompts_of = |topics: &[usize]| -> Vec<Prompt> {
        topics
            .iter()
            .flat_map(|&t| constraint_kinds().into_iter().map(move |kind| (t, kind)))
            .map(|(t, (wording, constraint))| {
                let topic = TOPICS[t];
                Prompt::new(capitalized(&wording.replace("{topic}", topic)))
                    .with("constraint", constraint)
                    .with("topic", topic.into())
            })
            .collect()
    };
    let train = prompts_of(&order[..train_topics]);
    let heldout = prompts_of(&order[train_topics..train_topics + heldout_topics]);
    Ok((train, heldout))
}

/// `0..n` in a seeded order (Fisher–Yates over SplitMix64), the same on every platform.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::Instruction;

    #[test]
    fn the_sets_are_disjoint_by_topic_and_every_prompt_is_checkable() {
        let (train, heldout) = instruction_prompts(3, 60, 25).expect("prompts");
        assert_eq!((train.len(), heldout.len()), (300, 125));
        let topic = |p: &Prompt| p.fields["topic"].as_str().unwrap().to_string();
        let train_topics: std::collections::HashSet<String> = train.iter().map(topic).collect();
        assert!(heldout.iter().all(|p| !train_topics.contains(&topic(p))));
        for prompt in train.iter().chain(&heldout) {
            Instruction::from_prompt(prompt).expect("a checkable instruction");
        }
        assert_eq!(instruction_prompts(3, 60, 25).unwrap().0, train, "seeded");
        assert!(instruction_prompts(3, 80, 25).is_err());
    }
}
