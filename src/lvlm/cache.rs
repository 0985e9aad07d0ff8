//! Answers kept in the store, keyed by the hash of the request that produced them, so a rerun or a
//! resumed run asks nothing twice:
//!
//! ```text
//! lvlm/answers/<first two hex digits>/<sha256 of the request>.json     the reply and what it cost
//! ```
//! An answer is written create-only as soon as it arrives; a run stopped half-way keeps every answer
//! it got.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::backend::{Reply, Request};
use crate::store::{key, Store, StoreError};

/// The cache key of `request` sent to the backend that calls itself `backend`: the sha256 of both,
/// images by their content hash.
pub fn request_hash(backend: &str, request: &Request) -> String {
    #[derive(Serialize)]
    struct Keyed<'a> {
        backend: &'a str,
        prompt: &'a str,
        images: Vec<&'a str>,
        labels: usize,
        list_length: usize,
        max_tokens: usize,
    }
    let keyed = Keyed {
        backend,
        prompt: &request.prompt,
        images: request.images.iter().map(|i| i.sha256.as_str()).collect(),
        labels: request.labels,
        list_length: request.list_length,
        max_tokens: request.max_tokens,
    };
    hex::encode(Sha256::digest(serde_json::to_vec(&keyed).unwrap_or_default()))
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    backend: String,
    reply: Reply,
}

/// The answer cache under a storage root.
pub struct AnswerCache {
    store: Store,
}

fn entry_key(hash: &str) -> String {
    key(&["lvlm", "answers", &hash[..2.min(hash.len())], &format!("{hash}.json")])
}

impl AnswerCache {
    pub fn new(store: &Store) -> Self {
        Self { store: store.clone() }
    }

    /// The cached reply to the request with this hash, if any. An unreadable entry is a miss (the
    /// request is sent again and the entry rewritten).
    pub fn get(&self, hash: &str) -> Result<Option<Reply>, StoreError> {
        let Some(bytes) = self.store.get_opt(&entry_key(hash))? else { return Ok(None) };
        Ok(serde_json::from_slice::<Entry>(&bytes).ok().map(|e| e.reply))
    }

    pub fn put(&self, hash: &str, backend: &str, reply: &Reply) -> Result<(), StoreError> {
        let entry = Entry { backend: backend.to_string(), reply: reply.clone() };
        let bytes = serde_json::to_vec_pretty(&entry).unwrap_or_default();
        self.store.put(&entry_key(hash), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lvlm::backend::Image;

    fn request(prompt: &str) -> Request {
        Request { prompt: prompt.into(), images: Vec::new(), labels: 3, list_length: 3, max_tokens: 50 }
    }

    #[test]
    fn the_hash_covers_backend_prompt_images_and_decoding_limits() {
        let base = request_hash("m", &request("p"));
        assert_eq!(base, request_hash("m", &request("p")));
        assert_ne!(base, request_hash("other model", &request("p")));
        assert_ne!(base, request_hash("m", &request("q")));
        let mut r = request("p");
        r.max_tokens = 51;
        assert_ne!(base, request_hash("m", &r));
        let mut r = request("p");
        r.images.push(Image::from_png(vec![1, 2, 3]));
        assert_ne!(base, request_hash("m", &r));
    }

    #[test]
    fn replies_round_trip_and_unreadable_entries_are_misses() {
        let store = Store::open("memory://").unwrap();
        let cache = AnswerCache::new(&store);
        let h = request_hash("m", &request("p"));
        assert!(cache.get(&h).unwrap().is_none());
        let reply =
            Reply { text: "{\"recommendations\": [1]}".into(), prompt_tokens: 12, completion_tokens: 5, seconds: 0.5 };
        cache.put(&h, "m", &reply).unwrap();
        assert_eq!(AnswerCache::new(&store).get(&h).unwrap(), Some(reply));
        store.put(&entry_key(&h), b"{truncated".to_vec()).unwrap();
        assert!(cache.get(&h).unwrap().is_none());
    }
}
