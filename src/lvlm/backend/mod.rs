//! What answers a prompt: a `Backend` takes requests (a prompt, images, the candidate labels the
//! answer ranks) and returns each one's reply text and what it cost. `openai` talks to any
//! OpenAI-compatible chat-completions endpoint; `local` runs a Llama-family text model in process with
//! decoding constrained to the answer's JSON; `vision` runs a vision-language model in process.

pub mod local;
pub mod openai;
pub mod vision;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// An image in a prompt: PNG bytes and their sha256.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub png: Vec<u8>,
    pub sha256: String,
}

impl Image {
    pub fn from_png(png: Vec<u8>) -> Self {
        let sha256 = hex::encode(Sha256::digest(&png));
        Self { png, sha256 }
    }
}

/// One prompt to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The user message.
    pub prompt: String,
    /// Images that go with it, in order.
    pub images: Vec<Image>,
    /// The candidates are numbered 1..=labels in the prompt.
    pub labels: usize,
    /// How many of them the answer ranks.
    pub list_length: usize,
    /// At most this many answer tokens.
    pub max_tokens: usize,
}

/// A model's answer and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Wall time of the request (retries included), or this request's share of a batch.
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request failed for good (retries used up, a reply that is no chat completion, ...):
    /// counted for its user, the run goes on.
    #[error("{0}")]
    Request(String),
    /// No request can succeed (refused credentials, a model that cannot load): the run stops.
    #[error("{0}")]
    Fatal(String),
}

/// Answers requests.
pub trait Backend {
    /// The model and decoding settings, as one string: part of every cache key, so a change of model
    /// or settings never reuses another's answers. Never holds a secret.
    fn identity(&self) -> String;

    /// Whether requests may carry images.
    fn sees_images(&self) -> bool;

    /// Where the time of the requests answered so far went, for reports (in-process backends).
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Answers every request, calling `done(i, reply)` as request `i` finishes (in any order).
    /// A per-request failure goes to `done`; an error return stops the run.
    fn answer(
        &self,
        requests: &[Request],
        done: &mut dyn FnMut(usize, Result<Reply, BackendError>),
    ) -> Result<(), BackendError>;
}
