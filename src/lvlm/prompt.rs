//! Prompt templates (`prompts/lvlm/`, carried in the binary, or a folder named by `lvlm.prompts`) and
//! their rendering: `{name}` is a value, `{?flag}...{/flag}` a section kept when the flag is set, and
//! any other brace is text (the JSON of the output format).

use std::path::Path;

use super::Strategy;

/// The templates of the four prompted strategies.
#[derive(Debug, Clone)]
pub struct Templates {
    s1: String,
    s3: String,
    s4: String,
    s5: String,
}

/// The values a template may use, and its flags.
pub const VALUES: [&str; 5] = ["count", "history", "n", "candidates", "k"];
pub const FLAGS: [&str; 4] = ["titles", "images", "one_image", "per_item"];

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("{file}: {reason}")]
    Template { file: String, reason: String },
}

impl Templates {
    /// The templates shipped in `prompts/lvlm/`.
    pub fn builtin() -> Self {
        Self {
            s1: include_str!("../../prompts/lvlm/s1.txt").into(),
            s3: include_str!("../../prompts/lvlm/s3.txt").into(),
            s4: include_str!("../../prompts/lvlm/s4.txt").into(),
            s5: include_str!("../../prompts/lvlm/s5.txt").into(),
        }
    }

    /// `s1.txt`, `s3.txt`, `s4.txt` and `s5.txt` from `dir`, each checked by rendering it once.
    pub fn from_dir(dir: &Path) -> Result<Self, PromptError> {
        let read = |name: &str| {
            let p = dir.join(name);
            let text = std::fs::read_to_string(&p)
                .map_err(|e| PromptError::Template { file: p.display().to_string(), reason: e.to_string() })?;
            let values: Vec<(&str, String)> = VALUES.iter().map(|v| (*v, String::new())).collect();
            let flags: Vec<(&str, bool)> = FLAGS.iter().map(|f| (*f, true)).collect();
            render(&text, &values, &flags)
                .map_err(|reason| PromptError::Template { file: p.display().to_string(), reason })?;
            Ok(text)
        };
        Ok(Self { s1: read("s1.txt")?, s3: read("s3.txt")?, s4: read("s4.txt")?, s5: read("s5.txt")? })
    }

    /// The template of a prompted strategy (S2 has none: its LVLM only captions).
    pub fn of(&self, s: Strategy) -> Option<&str> {
        match s {
            Strategy::S1 => Some(&self.s1),
            Strategy::S3 => Some(&self.s3),
            Strategy::S4 => Some(&self.s4),
            Strategy::S5 => Some(&self.s5),
            Strategy::S2 => None,
        }
    }
}

/// Fills `template`; an unknown `{name}`, an unclosed or stray section is an error.
pub fn render(template: &str, values: &[(&str, String)], flags: &[(&str, bool)]) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() * 2);
    // Open sections and whether each is kept.
    let mut open: Vec<(&str, bool)> = Vec::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        let keep = open.iter().all(|(_, k)| *k);
        if keep {
            out.push_str(&rest[..i]);
        }
        let after = &rest[i + 1..];
        let close = after.find('}');
        let tag = close.map(|c| &after[..c]).filter(|t| {
            let name = t.strip_prefix(['?', '/']).unwrap_or(t);
            !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        });
        let Some(tag) = tag else {
            if keep {
                out.push('{');
            }
            rest = after;
            continue;
        };
        if let Some(flag) = tag.strip_prefix('?') {
            let set = flags.iter().find(|(f, _)| *f == flag).ok_or_else(|| format!("unknown flag `{{?{flag}}}`"))?.1;
            open.push((flag, set));
        } else if let Some(flag) = tag.strip_prefix('/') {
            match open.pop() {
                Some((f, _)) if f == flag => {}
                _ => return Err(format!("`{{/{flag}}}` closes no open `{{?{flag}}}`")),
            }
        } else {
            let value = values.iter().find(|(v, _)| *v == tag).ok_or_else(|| format!("unknown value `{{{tag}}}`"))?;
            if keep {
                out.push_str(&value.1);
            }
        }
        rest = &after[tag.len() + 1..];
    }
    if let Some((f, _)) = open.last() {
        return Err(format!("`{{?{f}}}` is never closed"));
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_sections_and_literal_braces() {
        let t = "{?a}A{count}{?b} and B{/b}.{/a} JSON: {\"x\": [{k}]} {} {not a tag!}";
        let values = [("count", "3".to_string()), ("k", "5".to_string())];
        assert_eq!(render(t, &values, &[("a", true), ("b", false)]).unwrap(), "A3. JSON: {\"x\": [5]} {} {not a tag!}");
        assert_eq!(render(t, &values, &[("a", false), ("b", true)]).unwrap(), " JSON: {\"x\": [5]} {} {not a tag!}");
        assert!(render("{cuont}", &values, &[]).unwrap_err().contains("unknown value `{cuont}`"));
        assert!(render("{?a}x", &values, &[("a", true)]).unwrap_err().contains("never closed"));
        assert!(render("x{/a}", &values, &[("a", true)]).unwrap_err().contains("closes no open"));
    }

    #[test]
    fn the_shipped_templates_render_and_a_folder_is_checked() {
        let t = Templates::builtin();
        let values: Vec<(&str, String)> = VALUES.iter().map(|v| (*v, format!("<{v}>"))).collect();
        for s in [Strategy::S1, Strategy::S3, Strategy::S4, Strategy::S5] {
            let flags: Vec<(&str, bool)> = FLAGS.iter().map(|f| (*f, *f != "per_item")).collect();
            let text = render(t.of(s).unwrap(), &values, &flags).unwrap();
            assert!(text.contains("<candidates>") && text.contains("\"recommendations\": [numbers of the <k>"));
        }
        let dir = tempfile::tempdir().unwrap();
        for name in ["s1.txt", "s3.txt", "s4.txt"] {
            std::fs::write(dir.path().join(name), "{history}").unwrap();
        }
        std::fs::write(dir.path().join("s5.txt"), "{histroy}").unwrap();
        let err = Templates::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("s5.txt: unknown value `{histroy}`"), "{err}");
    }
}
