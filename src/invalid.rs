//! A job section's verdict on its own values: which key (relative to the section) is wrong, and why.
//! Every section validates itself and returns this; `config` (the layer that assembles the sections)
//! prefixes the section's name and the file that set the key. A leaf: it imports nothing of ours.

#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into() }
    }
}
