//! I-LLMRec's prompts (docs/illmrec-method.md, "Prompts"), as segments: text, an item's token slot (filled
//! with the adapted item feature), and the [REC] slot. The tokenizer and the model turn segments into
//! input embeddings; this module decides only what the prompt says.

use serde::{Deserialize, Serialize};

use super::dataset::Item;

/// How history items are described in the prompt (the paper's comparison).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Variant {
    /// Title and one token made from the item's feature (I-LLMRec).
    #[serde(rename = "image")]
    Image,
    /// Title only (attribute-based, TALLRec-like).
    #[serde(rename = "title")]
    Title,
    /// Title and description text (TRSR-like).
    #[serde(rename = "description")]
    Description,
    /// Title, description and the item token (I-LLMRec+D).
    #[serde(rename = "image+description")]
    ImageDescription,
}

impl Variant {
    pub const ALL: [Variant; 4] = [Variant::Image, Variant::Title, Variant::Description, Variant::ImageDescription];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Image => "image",
            Variant::Title => "title",
            Variant::Description => "description",
            Variant::ImageDescription => "image+description",
        }
    }

    pub fn has_item_token(self) -> bool {
        matches!(self, Variant::Image | Variant::ImageDescription)
    }

    fn has_description(self) -> bool {
        matches!(self, Variant::Description | Variant::ImageDescription)
    }
}

impl std::str::FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Variant::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| format!("unknown prompt variant `{s}` (image, title, description, image+description)"))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Text(String),
    /// The token slot of item (index); its embedding is the adaptor's output.
    ItemToken(u32),
    /// The learnable [REC] vector; its final hidden state is the user representation.
    Rec,
    /// The tokenizer's beginning-of-sequence token, when it has one.
    Bos,
}

/// A prompt and, for the alignment task, the answer whose tokens (and EOS) are supervised.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub segments: Vec<Segment>,
    pub answer: Option<String>,
    /// How many leading segments are the template's constant opening, the same in every prompt of
    /// its kind: the LLM computes them once (its prefix cache).
    pub prefix: usize,
}

/// What the alignment question asks about the next item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Property {
    Title,
    Feature,
    Brand,
    Category,
}

impl Property {
    pub const ALL: [Property; 4] = [Property::Title, Property::Feature, Property::Brand, Property::Category];

    /// The property's value for `item`, empty when the item has none.
    pub fn value(self, item: &Item) -> String {
        let m = &item.meta;
        match self {
            Property::Title => m.title.clone(),
            Property::Feature => {
                if m.features.is_empty() {
                    m.description.clone()
                } else {
                    m.features.join(" ")
                }
            }
            Property::Brand => m.brand.clone(),
            Property::Category => m.categories.join(", "),
        }
    }

    /// Five paraphrases of the question, as the authors' templates vary it.
    pub fn question(self, paraphrase: usize) -> &'static str {
        const TITLE: [&str; 5] = [
            "what is the title of the next item the user will consume?",
            "can you tell me the title of the item this user is likely to choose next?",
            "predict the title of the next item that this user will interact with.",
            "which item title is the user expected to pick next?",
            "what would be the title of the item the user consumes next?",
        ];
        const FEATURE: [&str; 5] = [
            "what are the features of the next item the user will consume?",
            "describe the details of the item this user is likely to choose next.",
            "predict the characteristics of the next item that this user will interact with.",
            "what details describe the item the user is expected to pick next?",
            "list the features of the item the user consumes next.",
        ];
        const BRAND: [&str; 5] = [
            "what is the brand of the next item the user will consume?",
            "can you tell me the brand of the item this user is likely to choose next?",
            "predict the brand of the next item that this user will interact with.",
            "which brand is the user expected to pick next?",
            "what would be the brand of the item the user consumes next?",
        ];
        const CATEGORY: [&str; 5] = [
            "what is the category of the next item the user will consume?",
            "can you tell me the category of the item this user is likely to choose next?",
            "predict the category of the next item that this user will interact with.",
            "which category is the user expected to pick next?",
            "what would be the category of the item the user consumes next?",
        ];
        let list = match self {
            Property::Title => &TITLE,
            Property::Feature => &FEATURE,
            Property::Brand => &BRAND,
            Property::Category => &CATEGORY,
        };
        list[paraphrase % list.len()]
    }

    fn answer(self, value: &str) -> String {
        match self {
            Property::Title => format!("The title of the next item to be consumed is '{value}'"),
            Property::Feature => format!("The details of the next item to be consumed is as follows: '{value}'"),
            Property::Brand => format!("The brand of the next item to be consumed is '{value}'"),
            Property::Category => format!("The category of the next item to be consumed is '{value}'"),
        }
    }
}

const SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives \
helpful, detailed, and polite answers to the user's questions.";
const HISTORY_HEAD: &str = "Your job is to recommend a suitable next item based on a user's interacted items. This \
user has chronologically interacted with following items: [";
const HISTORY_TAIL: &str = "], where each interacted item's information is contained in curly brackets (i.e.,{}). ";
const RETRIEVAL_ASK: &str = "Please conduct an analysis of user preferences based on the interacted items, and then \
generate a recommendation token for the next item to be consumed: ";
const ALIGNMENT_ASK: &str =
    "Please conduct an analysis of user preference, taking into account the interacted items. Based on your analysis, ";

/// Builds prompts for one variant; descriptions are cut to `max_description_words` words.
pub struct PromptBuilder {
    pub variant: Variant,
    pub max_description_words: usize,
}

/// Appends text to the last text segment, or starts a new one.
fn push_text(out: &mut Vec<Segment>, text: &str) {
    if let Some(Segment::Text(t)) = out.last_mut() {
        t.push_str(text);
    } else {
        out.push(Segment::Text(text.to_string()));
    }
}

impl PromptBuilder {
    /// One history item: `{Title: t, Description: d, Visual representation: <token>}`.
    pub fn item_piece(&self, item: &Item, out: &mut Vec<Segment>) {
        let title = if item.meta.title.trim().is_empty() { "Unknown" } else { item.meta.title.trim() };
        push_text(out, &format!("{{Title: {title}"));
        if self.variant.has_description() {
            let words: Vec<&str> = item.meta.description.split_whitespace().take(self.max_description_words).collect();
            let d = if words.is_empty() { "Unknown".to_string() } else { words.join(" ") };
            push_text(out, &format!(", Description: {d}"));
        }
        if self.variant.has_item_token() {
            push_text(out, ", Visual representation: ");
            out.push(Segment::ItemToken(item.index));
        }
        push_text(out, "}");
    }

    /// The history after its constant head: the items, then the closing text.
    fn history(&self, items: &[&Item], out: &mut Vec<Segment>) {
        for (k, item) in items.iter().enumerate() {
            if k > 0 {
                push_text(out, ", ");
            }
            self.item_piece(item, out);
        }
        push_text(out, HISTORY_TAIL);
    }

    /// The constant opening, as its own segments (tokenized on its own, so its tokens never merge
    /// with the first item's), followed by the rest.
    fn with_prefix(opening: String, rest: Vec<Segment>, answer: Option<String>) -> Prompt {
        let mut segments = vec![Segment::Bos, Segment::Text(opening)];
        let prefix = segments.len();
        segments.extend(rest);
        Prompt { segments, answer, prefix }
    }

    /// RERI: BOS + history + the request + [REC].
    pub fn retrieval(&self, history: &[&Item]) -> Prompt {
        let mut s = Vec::new();
        self.history(history, &mut s);
        push_text(&mut s, RETRIEVAL_ASK);
        s.push(Segment::Rec);
        Self::with_prefix(HISTORY_HEAD.to_string(), s, None)
    }

    /// RISA, Vicuna-v1 style: system, "USER: " history + question, " ASSISTANT: ", then the answer.
    pub fn alignment(&self, history: &[&Item], target: &Item, property: Property, paraphrase: usize) -> Prompt {
        let mut s = Vec::new();
        self.history(history, &mut s);
        push_text(&mut s, ALIGNMENT_ASK);
        push_text(&mut s, property.question(paraphrase));
        push_text(&mut s, " ASSISTANT: ");
        let answer = Some(property.answer(&property.value(target)));
        Self::with_prefix(format!("{SYSTEM} USER: {HISTORY_HEAD}"), s, answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ingest::ItemMeta;

    fn item(index: u32, title: &str) -> Item {
        let meta = ItemMeta {
            title: title.into(),
            description: "one two three four".into(),
            brand: "Kalo".into(),
            ..Default::default()
        };
        Item { index, id: format!("i{index}"), meta, image: None }
    }

    fn text(p: &Prompt) -> String {
        p.segments
            .iter()
            .map(|s| match s {
                Segment::Text(t) => t.clone(),
                Segment::ItemToken(i) => format!("<i_vis:{i}>"),
                Segment::Rec => "[REC]".into(),
                Segment::Bos => "<s>".into(),
            })
            .collect()
    }

    #[test]
    fn retrieval_prompt_has_one_token_per_item_and_ends_with_rec() {
        let (a, b) = (item(3, "Pen"), item(7, ""));
        let p = PromptBuilder { variant: Variant::Image, max_description_words: 2 }.retrieval(&[&a, &b]);
        assert_eq!(
            text(&p),
            format!(
                "<s>{HISTORY_HEAD}{{Title: Pen, Visual representation: <i_vis:3>}}, {{Title: Unknown, Visual representation: <i_vis:7>}}{HISTORY_TAIL}{RETRIEVAL_ASK}[REC]"
            )
        );
        // The constant opening is segments of its own: BOS and the history's head.
        assert_eq!(p.prefix, 2);
        assert_eq!(p.segments[1], Segment::Text(HISTORY_HEAD.to_string()));
        let d = PromptBuilder { variant: Variant::ImageDescription, max_description_words: 2 }.retrieval(&[&a]);
        assert!(text(&d).contains("{Title: Pen, Description: one two, Visual representation: <i_vis:3>}"));
        let t = PromptBuilder { variant: Variant::Title, max_description_words: 2 }.retrieval(&[&a]);
        assert!(text(&t).contains("[{Title: Pen}]"));
        assert!(!t.segments.iter().any(|s| matches!(s, Segment::ItemToken(_))));
    }

    #[test]
    fn alignment_prompt_asks_about_the_next_item_and_carries_the_answer() {
        let (a, target) = (item(1, "Pen"), item(2, "Lamp"));
        let p = PromptBuilder { variant: Variant::Image, max_description_words: 5 }.alignment(
            &[&a],
            &target,
            Property::Brand,
            2,
        );
        let t = text(&p);
        assert!(t.starts_with(&format!("<s>{SYSTEM} USER: {HISTORY_HEAD}")), "{t}");
        assert!(
            t.ends_with("predict the brand of the next item that this user will interact with. ASSISTANT: "),
            "{t}"
        );
        assert_eq!(p.answer.as_deref(), Some("The brand of the next item to be consumed is 'Kalo'"));
        assert_eq!((p.prefix, &p.segments[1]), (2, &Segment::Text(format!("{SYSTEM} USER: {HISTORY_HEAD}"))));
        assert_eq!(Property::Feature.value(&target), "one two three four", "no feature list: the description");
    }
}
