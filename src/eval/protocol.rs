//! Which candidates a target is ranked against.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Protocol {
    /// Every item except those in the user's history (RecBole's full-sort convention); the target
    /// itself stays a candidate.
    Full,
    /// The target plus the first N of the user's stored negatives (1+100 in the paper, 1+29 in
    /// MSRBench).
    Sampled(usize),
    /// The fixed test candidate lists stored with the snapshot (`data.candidates`), for the users
    /// they name.
    Candidates,
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "full" {
            return Ok(Protocol::Full);
        }
        if s == "candidates" {
            return Ok(Protocol::Candidates);
        }
        match s.strip_prefix("sampled:").map(str::parse::<usize>) {
            Some(Ok(n)) if n > 0 => Ok(Protocol::Sampled(n)),
            _ => Err(format!("unknown protocol `{s}`: use full, sampled:N (N > 0, e.g. sampled:100) or candidates")),
        }
    }
}

impl TryFrom<String> for Protocol {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Protocol> for String {
    fn from(p: Protocol) -> String {
        p.to_string()
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Full => write!(f, "full"),
            Protocol::Sampled(n) => write!(f, "sampled:{n}"),
            Protocol::Candidates => write!(f, "candidates"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for s in ["full", "sampled:100", "sampled:29", "candidates"] {
            assert_eq!(s.parse::<Protocol>().unwrap().to_string(), s);
        }
        for bad in ["sampled:0", "sampled:", "sampled:x", "all"] {
            assert!(bad.parse::<Protocol>().is_err(), "{bad}");
        }
    }
}
