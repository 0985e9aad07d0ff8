//! A small template language for the files in `slurm/` and `k8s/`: `{{name}}` inside a line is
//! replaced by a value; a line that holds only `{{name}}` (after indentation) is replaced by a block
//! of lines, each indented like the placeholder, or removed when the block is empty. Every
//! placeholder must have a value and every value must be used, so a template and its renderer
//! cannot drift apart silently.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {template}, line {line}: no value for `{{{{{name}}}}}`")]
    Missing { template: String, line: usize, name: String },
    #[error("template {template}: values never used: {names}")]
    Unused { template: String, names: String },
    #[error("template {template}, line {line}: unclosed `{{{{`")]
    Unclosed { template: String, line: usize },
}

/// Values for one rendering: inline scalars and line blocks.
#[derive(Debug, Default)]
pub struct Values {
    scalars: BTreeMap<String, String>,
    blocks: BTreeMap<String, Vec<String>>,
}

impl Values {
    pub fn set(&mut self, name: &str, value: impl ToString) -> &mut Self {
        self.scalars.insert(name.into(), value.to_string());
        self
    }

    pub fn block(&mut self, name: &str, lines: Vec<String>) -> &mut Self {
        self.blocks.insert(name.into(), lines);
        self
    }
}

pub fn render(template_name: &str, text: &str, values: &Values) -> Result<String, TemplateError> {
    let mut used = std::collections::BTreeSet::new();
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let whole = trimmed.strip_prefix("{{").and_then(|r| r.strip_suffix("}}")).filter(|n| !n.contains("{{"));
        if let Some(lines) = whole.and_then(|n| values.blocks.get(n.trim())) {
            used.insert(whole.unwrap_or_default().trim().to_string());
            let indent = &line[..line.len() - trimmed.len()];
            for l in lines {
                out.push_str(indent);
                out.push_str(l);
                out.push('\n');
            }
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| TemplateError::Unclosed { template: template_name.into(), line: i + 1 })?;
            let name = after[..end].trim();
            let value = values.scalars.get(name).ok_or_else(|| TemplateError::Missing {
                template: template_name.into(),
                line: i + 1,
                name: name.into(),
            })?;
            used.insert(name.to_string());
            out.push_str(value);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        out.push('\n');
    }
    let unused: Vec<&String> =
        values.scalars.keys().chain(values.blocks.keys()).filter(|k| !used.contains(k.as_str())).collect();
    if !unused.is_empty() {
        let names = unused.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
        return Err(TemplateError::Unused { template: template_name.into(), names });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_blocks_and_empty_blocks() {
        let mut v = Values::default();
        v.set("name", "demo").set("n", 2).block("env", vec!["- a: 1".into(), "- b: 2".into()]).block("none", vec![]);
        let t = "job: {{name}} x{{ n }}\nspec:\n  env:\n    {{env}}\n    {{none}}\nend\n";
        assert_eq!(render("t", t, &v).unwrap(), "job: demo x2\nspec:\n  env:\n    - a: 1\n    - b: 2\nend\n");
    }

    #[test]
    fn a_missing_or_unused_value_is_an_error_naming_it() {
        let mut v = Values::default();
        v.set("a", 1);
        let err = render("t.yaml", "{{b}}\n", &v).unwrap_err().to_string();
        assert!(err.contains("t.yaml, line 1") && err.contains("{{b}}"), "{err}");
        v.set("b", 2).set("c", 3);
        let err = render("t.yaml", "{{a}} {{b}}\n", &v).unwrap_err().to_string();
        assert!(err.contains("never used: c"), "{err}");
    }
}
