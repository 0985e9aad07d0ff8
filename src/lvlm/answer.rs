//! Reading a model's answer: the JSON object is taken out of whatever prose or code fence surrounds
//! it, its `recommendations` list is mapped to the candidates shown in the prompt (by their number
//! or by their title), and what does not map is counted: names outside the candidate list are
//! hallucinations, repeats are duplicates. A list cut off by the token limit keeps the items it
//! has. An answer with no JSON list but a numbered list of lines ("1. Some title"), which small
//! models write whatever the prompt asks, is read as that list of titles.

use serde_json::Value;

/// Keys a ranked list may come under (ours first; `ranking` and `items` are what models reach for).
const LIST_KEYS: [&str; 3] = ["recommendations", "ranking", "items"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the answer holds no JSON list of recommendations")]
    NoList,
}

/// An answer mapped onto the candidates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Positions (0-based, in the prompt's order) of the candidates named, best first, each once.
    pub ranking: Vec<usize>,
    pub explanation: String,
    /// Entries of the list: named items, hallucinations and duplicates together.
    pub named: usize,
    /// Entries that match no candidate.
    pub hallucinated: usize,
    /// Entries naming a candidate already ranked.
    pub duplicates: usize,
    /// The list was not closed (the answer ran out of tokens).
    pub truncated: bool,
}

/// Lower case, HTML entities decoded, every run of other characters than letters and digits one space.
pub fn normalise_title(title: &str) -> String {
    let decoded = decode_entities(title).to_lowercase();
    let mut out = String::with_capacity(decoded.len());
    for c in decoded.chars() {
        if c.is_alphanumeric() {
            out.push(c);
        } else if !out.ends_with(' ') {
            out.push(' ');
        }
    }
    out.trim().to_string()
}

/// The entities that occur in product titles (`&amp;`, `&reg;`, numeric ones, ...).
fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let end = rest[..rest.len().min(10)].find(';');
        let decoded = end.and_then(|e| {
            let name = &rest[1..e];
            let c = match name {
                "amp" => Some('&'),
                "quot" => Some('"'),
                "apos" | "#39" => Some('\''),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "reg" => Some('®'),
                "trade" => Some('™'),
                "copy" => Some('©'),
                "nbsp" => Some(' '),
                n => n
                    .strip_prefix("#x")
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .or_else(|| n.strip_prefix('#').and_then(|d| d.parse().ok()))
                    .and_then(char::from_u32),
            };
            c.map(|c| (c, e))
        });
        match decoded {
            Some((c, e)) => {
                out.push(c);
                rest = &rest[e + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Maps an answer onto `titles`, the candidates as the prompt listed them (candidate `i` was shown
/// as number `i + 1`).
pub fn parse(text: &str, titles: &[String]) -> Result<Parsed, ParseError> {
    let (entries, explanation, truncated) = find_list(text).ok_or(ParseError::NoList)?;
    let normalised: Vec<String> = titles.iter().map(|t| normalise_title(t)).collect();
    let mut out = Parsed { explanation, truncated, named: entries.len(), ..Parsed::default() };
    let mut taken = vec![false; titles.len()];
    for entry in &entries {
        match resolve(entry, &normalised, &taken) {
            Some(i) if taken[i] => out.duplicates += 1,
            Some(i) => {
                taken[i] = true;
                out.ranking.push(i);
            }
            None => out.hallucinated += 1,
        }
    }
    Ok(out)
}

/// The list entries, the explanation and whether the list was cut off, from the first JSON object
/// in `text` that carries a list key (else the first bare JSON list, else a list cut off at the end).
fn find_list(text: &str) -> Option<(Vec<Value>, String, bool)> {
    let mut first_array = None;
    for (i, c) in text.char_indices() {
        if c != '{' && c != '[' {
            continue;
        }
        let mut stream = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(Value::Object(map))) => {
                if let Some(list) = LIST_KEYS.iter().find_map(|k| map.get(*k)) {
                    let explanation = match map.get("explanation") {
                        Some(Value::String(s)) => s.clone(),
                        Some(v @ Value::Array(_)) | Some(v @ Value::Object(_)) => v.to_string(),
                        _ => String::new(),
                    };
                    let entries = match list {
                        Value::Array(a) => a.clone(),
                        Value::String(s) => s.split(',').map(|p| Value::String(p.trim().to_string())).collect(),
                        other => vec![other.clone()],
                    };
                    return Some((entries, explanation, false));
                }
            }
            Some(Ok(Value::Array(a))) if first_array.is_none() => first_array = Some(a),
            _ => {}
        }
    }
    if let Some(a) = first_array {
        return Some((a, String::new(), false));
    }
    if let Some(entries) = truncated_list(text) {
        return Some((entries, String::new(), true));
    }
    numbered_lines(text).map(|entries| (entries, String::new(), false))
}

/// The entries of a plain numbered list: at least two lines `N. text` or `N) text`, each entry the
/// text after its ordinal (an ordinal is the list's own count, not a candidate number).
fn numbered_lines(text: &str) -> Option<Vec<Value>> {
    let entries: Vec<Value> = text
        .lines()
        .filter_map(|line| {
            let t = line.trim_start();
            let digits = t.chars().take_while(char::is_ascii_digit).count();
            let rest = t[digits..].strip_prefix(['.', ')'])?;
            (digits > 0 && rest.starts_with(' ') && !rest.trim().is_empty())
                .then(|| Value::String(rest.trim().to_string()))
        })
        .collect();
    (entries.len() >= 2).then_some(entries)
}

/// The entries of a list under a list key that the answer never closed: every complete entry up to
/// where the text stops.
fn truncated_list(text: &str) -> Option<Vec<Value>> {
    let key = LIST_KEYS.iter().find_map(|k| text.find(&format!("\"{k}\"")))?;
    let open = key + text[key..].find('[')?;
    let mut rest = &text[open + 1..];
    let mut entries = Vec::new();
    loop {
        rest = rest.trim_start();
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v)) => {
                entries.push(v);
                rest = rest[stream.byte_offset()..].trim_start();
                match rest.strip_prefix(',') {
                    Some(r) => rest = r,
                    None => break,
                }
            }
            _ => break,
        }
    }
    (!entries.is_empty()).then_some(entries)
}

/// The candidate an entry names: a number (1-based, as shown), a string that starts with one
/// ("3", "[3] Lipstick", "3. Lipstick"), an object with a title or number field, or a title.
fn resolve(entry: &Value, titles: &[String], taken: &[bool]) -> Option<usize> {
    match entry {
        Value::Number(n) => by_number(n.as_u64()?, titles.len()),
        Value::String(s) => by_number_prefix(s, titles.len()).or_else(|| by_title(s, titles, taken)),
        Value::Object(m) => ["id", "number", "index", "candidate", "title", "item", "name"]
            .iter()
            .filter_map(|k| m.get(*k))
            .find_map(|v| resolve(v, titles, taken)),
        _ => None,
    }
}

fn by_number(n: u64, count: usize) -> Option<usize> {
    (n >= 1 && n as usize <= count).then(|| n as usize - 1)
}

/// A string that is a number, or starts with one in brackets or followed by `.` / `)` / `:`.
fn by_number_prefix(s: &str, count: usize) -> Option<usize> {
    let t = s.trim();
    let t = t.strip_prefix('[').or_else(|| t.strip_prefix('(')).unwrap_or(t).trim_start();
    let digits: String = t.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() {
        return None;
    }
    let after = t[digits.len()..].trim_start();
    let closed = after.is_empty() || after.starts_with([']', ')', '.', ':']);
    if !closed {
        return None;
    }
    by_number(digits.parse().ok()?, count)
}

/// A title: equal after normalisation (the first candidate not ranked yet, when several share it);
/// else the one candidate whose title starts with the entry or with which the entry starts (a
/// shortened or run-on title), when that is unambiguous.
fn by_title(s: &str, titles: &[String], taken: &[bool]) -> Option<usize> {
    let n = normalise_title(s);
    if n.is_empty() {
        return None;
    }
    let equal: Vec<usize> = (0..titles.len()).filter(|&i| titles[i] == n).collect();
    if let Some(&i) = equal.iter().find(|&&i| !taken[i]).or(equal.first()) {
        return Some(i);
    }
    // Prefixes only at word boundaries and of at least three words, so a lone brand does not match.
    if n.split(' ').count() < 3 {
        return None;
    }
    let prefix_of = |long: &str, short: &str| long.starts_with(short) && long[short.len()..].starts_with(' ');
    let close: Vec<usize> =
        (0..titles.len()).filter(|&i| prefix_of(&titles[i], &n) || prefix_of(&n, &titles[i])).collect();
    match close.as_slice() {
        [i] => Some(*i),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn titles() -> Vec<String> {
        [
            "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce",
            "Conair True Glow Sonic Facial Skincare System",
            "Glowzone Anti Aging Moisturizer with Matrixyl 3000&reg; for all skin types",
            "Swissco Deluxe Bath Brush, Tortoise 1 ea",
            "Swissco Deluxe Bath Brush, Tortoise 1 ea",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn json_inside_prose_and_code_fences_by_number() {
        let text = "Sure! Based on the history, here is my answer:\n```json\n{\"recommendations\": [2, 1, 4], \
                    \"explanation\": \"Skin care first.\"}\n```\nHope this helps {not json}.";
        let p = parse(text, &titles()).unwrap();
        assert_eq!(p.ranking, vec![1, 0, 3]);
        assert_eq!(p.explanation, "Skin care first.");
        assert_eq!((p.named, p.hallucinated, p.duplicates, p.truncated), (3, 0, 0, false));
        // The explanation may come first, and numbers may be strings with their title.
        let text = r#"{"explanation": "x", "recommendations": ["[3] Glowzone", "1. OPI Nail Lacquer", "2"]}"#;
        assert_eq!(parse(text, &titles()).unwrap().ranking, vec![2, 0, 1]);
    }

    #[test]
    fn titles_map_after_normalisation_entities_and_shortening() {
        let text = r#"{"recommendations": [
            "opi nail lacquer simmer and shimmer 0.5 fluid ounce",
            "Glowzone Anti Aging Moisturizer with Matrixyl 3000® for all skin types",
            "Conair True Glow Sonic",
            {"title": "Swissco Deluxe Bath Brush, Tortoise 1 ea"},
            "Swissco Deluxe Bath Brush, Tortoise 1 ea"
        ]}"#;
        let p = parse(text, &titles()).unwrap();
        // The two identical titles take the two candidates that carry it, in order.
        assert_eq!(p.ranking, vec![0, 2, 1, 3, 4]);
        assert_eq!(p.hallucinated, 0);
    }

    #[test]
    fn unknown_items_and_duplicates_are_counted_not_ranked() {
        let text = r#"{"recommendations": [2, 2, 31, 0, "Moon Rock Face Cream", "Conair", "[2] Conair", 1]}"#;
        let p = parse(text, &titles()).unwrap();
        assert_eq!(p.ranking, vec![1, 0]);
        // 31 and 0 are outside 1..=5; a title no candidate has; "Conair" alone is too short to match.
        assert_eq!((p.named, p.hallucinated, p.duplicates), (8, 4, 2));
    }

    #[test]
    fn cut_off_lists_keep_their_complete_entries_and_garbage_is_an_error() {
        let p = parse(r#"Answer: {"recommendations": [4, 1, "Conair True Glow Sonic Facial Ski"#, &titles()).unwrap();
        assert_eq!(p.ranking, vec![3, 0]);
        assert!(p.truncated);
        // A bare list is accepted too.
        assert_eq!(parse("I would pick [3, 1]", &titles()).unwrap().ranking, vec![2, 0]);
        for garbage in ["", "I cannot help with that.", "{\"answer\": \"lipstick\"}", "<html>502</html>"] {
            assert_eq!(parse(garbage, &titles()), Err(ParseError::NoList), "{garbage:?}");
        }
    }

    #[test]
    fn numbered_lines_of_titles_are_read_when_there_is_no_json() {
        // What SmolLM2-135M answers through llama-cpp-python's server on Beauty: titles, one per line,
        // numbered by their place in the answer; the last cut off by the token limit.
        let text = "Here you go:\n1. Conair True Glow Sonic Facial Skincare System\n2) OPI Nail Lacquer, Simmer \
                    and Shimmer, 0.5-Fluid Ounce\n3. Moon Rock Face Cream\n4. Glowzone Anti Aging Moisturizer with";
        let p = parse(text, &titles()).unwrap();
        assert_eq!(p.ranking, vec![1, 0, 2]);
        assert_eq!((p.named, p.hallucinated, p.truncated), (4, 1, false));
        // Dates or other non-titles are hallucinations, not a parse failure; one numbered line is no list.
        let p = parse("1. 2019-08-31\n2. 2019-08-31", &titles()).unwrap();
        assert_eq!((p.ranking.len(), p.hallucinated), (0, 2));
        assert_eq!(parse("1. I would pick the lamp.", &titles()), Err(ParseError::NoList));
    }

    #[test]
    fn normalisation_decodes_entities_and_folds_punctuation() {
        assert_eq!(normalise_title("Eye Splashes&reg; 70 Pairs  -  Lashes"), "eye splashes 70 pairs lashes");
        assert_eq!(normalise_title("Tom &amp; Jerry&#39;s &#x41;"), "tom jerry s a");
        assert_eq!(normalise_title("R&D &unknown"), "r d unknown");
    }
}
