//! Model folders as a user hands them over: the bundled tiny config saved with random
//! weights and a tokenizer, a hand-edited config.json, a Hub fixture's tokenizer and chat
//! template.

use std::path::{Path, PathBuf};

use refa_loss::model::{CausalLm, ChatTemplate, ChatTokenizer, ModelConfig, SaveOptions};
use serde_json::Value;
use tch::{Device, Kind};

use super::examples::repo_file;

/// The bundled tiny Mistral's configuration (`examples/data/tiny-config.json`).
pub fn tiny_config() -> ModelConfig {
    let text =
        std::fs::read_to_string(repo_file("examples/data/tiny-config.json")).expect("config");
    ModelConfig::from_json(&text).expect("config")
}

/// A model folder `parent/name` (config, random weights, the bundled tokenizer.json) saved
/// from the tiny config with `edit` applied to it first.
pub fn tiny_model_folder(
    parent: &Path,
    name: &str,
    edit: impl FnOnce(&mut ModelConfig),
) -> PathBuf {
    let mut config = tiny_config();
    edit(&mut config);
    let folder = parent.join(name);
    let model = CausalLm::new(config, Device::Cpu, Kind::Float, None).expect("model");
    model.init_random(3);
    model
        .save_pretrained(&folder, SaveOptions::default())
        .expect("save");
    std::fs::copy(
        repo_file("examples/data/tokenizer.json"),
        folder.join("tokenizer.json"),
    )
    .expect("tokenizer");
    folder
}

/// Rewrites `config.json` of `folder` with `fields` (a JSON object) set, bypassing the typed
/// config, as a hand-edited file would.
pub fn set_config_fields(folder: &Path, fields: Value) {
    let path = folder.join("config.json");
    let mut json: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    for (key, value) in fields.as_object().expect("an object of fields") {
        json[key] = value.clone();
    }
    std::fs::write(&path, json.to_string()).expect("write config");
}

/// A model folder `parent/family` with the tokenizer and chat template of the Hub fixture
/// `family` (tests/fixtures/chat_template/hub): the tiny config over that tokenizer's
/// vocabulary, random weights, and `fields` (its token ids) set in config.json.
pub fn hub_model_folder(parent: &Path, family: &str, fields: Value) -> PathBuf {
    let fixture = repo_file("tests/fixtures/chat_template/hub").join(family);
    let tokenizer = ChatTokenizer::from_file(
        fixture.join("tokenizer.json"),
        ChatTemplate::MistralInstruct,
        0,
        0,
    )
    .expect("tokenizer");
    let vocab = tokenizer.vocab_size();
    let folder = tiny_model_folder(parent, family, |c| c.vocab_size = vocab);
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(file), folder.join(file)).expect("copy");
    }
    set_config_fields(&folder, fields);
    folder
}
