//! The shape a locally decoded answer is held to, so it always parses:
//!
//! ```text
//! {"recommendations": [L, L, ..., L]}        exactly `length` distinct labels from 1..=labels
//! {"recommendations": [L, ..., L], "explanation": "..."}   when an explanation is asked for
//! ```
//! The opening is given, not generated. Inside the list a token is allowed when the list text with it
//! is still the beginning of a valid list; so any tokenizer works, whether it writes "17" as one token
//! or as "1", "7". Once the list is closed the answer ends (or the explanation follows, free text up to
//! a quote).

/// The text the answer starts with.
pub const OPENING: &str = "{\"recommendations\": [";
/// What follows a closed list when an explanation is asked for.
pub const EXPLANATION_OPENING: &str = ", \"explanation\": \"";
/// The characters a list token may consist of.
const LIST_ALPHABET: &str = "0123456789, ]";

/// How far a list text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListState {
    /// Not the beginning of any valid list.
    Invalid,
    /// A valid beginning.
    Open,
    /// A whole list, closed by `]`.
    Closed,
}

/// A ranked list of `length` distinct labels out of 1..=`labels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListGrammar {
    pub labels: usize,
    pub length: usize,
}

impl ListGrammar {
    pub fn new(labels: usize, length: usize) -> Self {
        Self { labels, length: length.min(labels) }
    }

    /// Checks the text after the opening `[`: labels without leading zeros, separated by ", ".
    pub fn check(&self, text: &str) -> ListState {
        let mut chosen = vec![false; self.labels + 1];
        let mut count = 0;
        let b = text.as_bytes();
        let mut i = 0;
        loop {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let digits = &text[start..i];
            if i == b.len() {
                // The text ends inside (or right before) a label: some unused label must start so.
                return if count < self.length && self.some_label_starts_with(digits, &chosen) {
                    ListState::Open
                } else {
                    ListState::Invalid
                };
            }
            let Some(label) = self.label(digits) else { return ListState::Invalid };
            if chosen[label] {
                return ListState::Invalid;
            }
            chosen[label] = true;
            count += 1;
            match b[i] {
                b']' if count == self.length && i + 1 == b.len() => return ListState::Closed,
                b',' if count < self.length => {
                    i += 1;
                    if i == b.len() {
                        return ListState::Open;
                    }
                    if b[i] != b' ' {
                        return ListState::Invalid;
                    }
                    i += 1;
                }
                _ => return ListState::Invalid,
            }
        }
    }

    /// The label `digits` spells, if it is one (no leading zero, within 1..=labels).
    fn label(&self, digits: &str) -> Option<usize> {
        if digits.is_empty() || digits.starts_with('0') {
            return None;
        }
        digits.parse::<usize>().ok().filter(|l| (1..=self.labels).contains(l))
    }

    fn some_label_starts_with(&self, digits: &str, chosen: &[bool]) -> bool {
        if digits.starts_with('0') {
            return false;
        }
        (1..=self.labels).any(|l| !chosen[l] && l.to_string().starts_with(digits))
    }
}

/// The tokens that can occur inside a list: those whose text uses only the list's characters.
pub fn list_tokens(texts: impl IntoIterator<Item = (u32, String)>) -> Vec<(u32, String)> {
    texts.into_iter().filter(|(_, t)| !t.is_empty() && t.chars().all(|c| LIST_ALPHABET.contains(c))).collect()
}

/// The positions in `tokens` that may come after the list text `so_far`, and whether each closes it.
pub fn allowed(grammar: &ListGrammar, so_far: &str, tokens: &[(u32, String)]) -> Vec<(usize, bool)> {
    let mut text = so_far.to_string();
    let base = text.len();
    tokens
        .iter()
        .enumerate()
        .filter_map(|(k, (_, t))| {
            text.truncate(base);
            text.push_str(t);
            match grammar.check(&text) {
                ListState::Invalid => None,
                ListState::Open => Some((k, false)),
                ListState::Closed => Some((k, true)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_checked_label_by_label() {
        let g = ListGrammar::new(12, 3);
        for open in ["", "1", "1, ", "1,", "1, 1", "12, 3", "12, 3, 1"] {
            assert_eq!(g.check(open), ListState::Open, "{open:?}");
        }
        assert_eq!(g.check("12, 3, 1]"), ListState::Closed);
        assert_eq!(g.check("12, 3, 10]"), ListState::Closed);
        for bad in ["0", "01", "13", "1, 1,", "1,2", "1 ", "1]", "1, 2, 3, 4", "1, 2, 3]]", "x", "2, 2"] {
            assert_eq!(g.check(bad), ListState::Invalid, "{bad:?}");
        }
        // With every label above 9 used, "1" can only start "1" itself.
        let g = ListGrammar::new(11, 3);
        assert_eq!(g.check("10, 11, 1"), ListState::Open);
        assert_eq!(g.check("10, 1, 11"), ListState::Open);
        assert_eq!(g.check("10, 11, 1, "), ListState::Invalid);
        // The length never exceeds the labels.
        assert_eq!(ListGrammar::new(2, 5).check("2, 1]"), ListState::Closed);
    }

    #[test]
    fn allowed_tokens_follow_the_text_so_far_in_any_tokenization() {
        let tokens = list_tokens(
            ["1", "2", "3", "12", ",", " ", ", ", "]", "]}", "a", "1,", " 3"]
                .iter()
                .enumerate()
                .map(|(i, t)| (i as u32, t.to_string())),
        );
        let texts: Vec<&str> = tokens.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(texts, ["1", "2", "3", "12", ",", " ", ", ", "]", "1,", " 3"]);
        let g = ListGrammar::new(12, 2);
        let names = |so_far: &str| -> Vec<(&str, bool)> {
            allowed(&g, so_far, &tokens).into_iter().map(|(k, c)| (texts[k], c)).collect()
        };
        assert_eq!(names(""), [("1", false), ("2", false), ("3", false), ("12", false), ("1,", false)]);
        assert_eq!(names("1"), [("1", false), ("2", false), (",", false), (", ", false), ("1,", false)]);
        assert_eq!(names("12,"), [(" ", false), (" 3", false)]);
        assert_eq!(names("12, 3"), [("]", true)]);
    }
}
