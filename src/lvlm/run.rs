//! One prompted strategy (S1, S3, S4, S5) over a set of users: build each user's prompt, take the
//! answers the cache has, ask the backend for the others (caching each as it arrives), map every answer
//! onto the candidates, rank the target, and add up the metrics and what the answers cost.

use std::time::Instant;

use rand::seq::SliceRandom;
use serde::Serialize;

use super::answer::{self, Parsed};
use super::backend::{Backend, BackendError, Reply, Request};
use super::cache::{request_hash, AnswerCache};
use super::config::{LvlmConfig, Strategy};
use super::images::{history_images, ImageMode};
use super::prompt::{render, Templates};
use super::LvlmError;
use crate::data::candidates::CandidateList;
use crate::data::{Dataset, Split};
use crate::eval::{MetricSums, Metrics, Protocol};
use crate::features::captions::Captions;
use crate::model::Scorer;
use crate::store::Store;
use crate::telemetry::{Progress, TelemetryConfig};

/// Users with their candidates: the snapshot's fixed lists, or the target and the first `n` stored
/// negatives shuffled by the seed; `users` samples either.
pub fn candidate_lists(ds: &Dataset, cfg: &LvlmConfig) -> Result<Vec<CandidateList>, LvlmError> {
    let all: Vec<CandidateList> = match cfg.protocol {
        Protocol::Candidates if ds.candidates.is_empty() => {
            return Err(LvlmError::Invalid(format!(
            "lvlm.protocol candidates: snapshot {} of {} has no fixed candidate lists (data.candidates); use sampled:N",
            ds.key, ds.name
        )))
        }
        Protocol::Candidates => ds.candidates.clone(),
        Protocol::Sampled(n) if n > ds.negatives.per_user => {
            return Err(LvlmError::Invalid(format!(
                "lvlm.protocol sampled:{n}: the snapshot stores {} negatives per user",
                ds.negatives.per_user
            )))
        }
        Protocol::Sampled(n) => (0..ds.num_users())
            .map(|user| {
                let target = ds.target(user, Split::Test);
                let mut candidates = vec![target];
                candidates.extend_from_slice(ds.negatives(user, Split::Test, n));
                candidates.shuffle(&mut crate::seed::stream(cfg.seed, "lvlm/candidates", user as u64));
                CandidateList { user, candidates, target }
            })
            .collect(),
        Protocol::Full => return Err(LvlmError::Invalid("lvlm.protocol full: prompts list candidates".into())),
    };
    let keep = cfg.users.pick(all.len(), cfg.seed);
    Ok(keep.into_iter().map(|i| all[i].clone()).collect())
}

/// What a strategy run reads besides the backend.
pub struct Inputs<'a> {
    pub ds: &'a Dataset,
    pub store: &'a Store,
    pub cfg: &'a LvlmConfig,
    pub templates: &'a Templates,
    /// Hit@k / NDCG@k cut-offs.
    pub ks: &'a [usize],
    pub lists: &'a [CandidateList],
    /// The model whose order S3 and S5 rerank.
    pub base: Option<&'a dyn Scorer>,
    /// Captions for S4 and S5 (without them the history is titles only).
    pub captions: Option<&'a Captions>,
    pub telemetry: &'a TelemetryConfig,
    /// Ask every request again instead of reading cached answers (a benchmark); answers are still
    /// cached.
    pub fresh: bool,
}

/// One user's answer, as the report keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct UserAnswer {
    pub user: String,
    pub target: String,
    /// 0-based; an unranked target ranks last.
    pub target_rank: usize,
    /// Item ids in the order the prompt listed them.
    pub candidates: Vec<String>,
    /// Item ids as the answer ranked them.
    pub ranking: Vec<String>,
    /// The prompt as sent, and how many images went with it.
    pub prompt: String,
    pub images: usize,
    pub explanation: String,
    /// The answer as the model wrote it.
    pub answer: String,
    /// Why the answer gave no ranking (a failed request, an answer without a list).
    pub error: Option<String>,
    pub hallucinated: usize,
    pub duplicates: usize,
    pub truncated: bool,
    pub cached: bool,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub seconds: f64,
}

/// What the answers cost and how many were usable.
#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    pub users: usize,
    pub requests_sent: usize,
    pub answers_cached: usize,
    /// Requests that failed for good.
    pub request_errors: usize,
    /// Answers without a list of recommendations.
    pub parse_failures: usize,
    pub parse_failure_pct: f64,
    /// Entries of the answers' lists, and those naming no candidate.
    pub named_items: usize,
    pub hallucinated_items: usize,
    pub hallucination_pct: f64,
    pub duplicate_items: usize,
    pub prompt_tokens_mean: f64,
    pub completion_tokens_mean: f64,
    /// Wall time of answering the requests sent, per request sent (when every answer came from the
    /// cache: the time each had cost, on average).
    pub seconds_per_user: f64,
    pub seconds_answering: f64,
    /// CPU time of this process while answering, per request sent (in-process backends; on a busy
    /// machine the wall time also holds other programs' turns).
    pub cpu_seconds_per_user: Option<f64>,
    /// The backend's own account of its time.
    pub backend: serde_json::Value,
}

pub struct StrategyReport {
    pub metrics: Metrics,
    pub answers: Vec<UserAnswer>,
    pub cost: Cost,
}

/// The title a prompt shows: whole, or its first `max_words` words.
fn shown_title(title: &str, max_words: Option<usize>) -> String {
    let t = title.trim();
    let t = if t.is_empty() { "no title" } else { t };
    match max_words {
        Some(n) if t.split_whitespace().count() > n => t.split_whitespace().take(n).collect::<Vec<_>>().join(" "),
        _ => t.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// The candidates in the order the prompt lists them: the base model's (best first, ties in list
/// order) for the rerankers, the list's own otherwise.
fn display_orders(strategy: Strategy, inp: &Inputs<'_>) -> Result<Vec<Vec<u32>>, LvlmError> {
    if !strategy.reranks() {
        return Ok(inp.lists.iter().map(|l| l.candidates.clone()).collect());
    }
    let base =
        inp.base.ok_or_else(|| LvlmError::Invalid(format!("{strategy} reranks a base model's order: none given")))?;
    let width = inp.ds.num_items() + 1;
    let mut out = Vec::with_capacity(inp.lists.len());
    for chunk in inp.lists.chunks(64) {
        let histories: Vec<&[u32]> = chunk.iter().map(|l| inp.ds.history(l.user, Split::Test)).collect();
        let scores = base.score(&histories)?;
        for (row, l) in chunk.iter().enumerate() {
            let s = &scores[row * width..(row + 1) * width];
            let mut order = l.candidates.clone();
            order.sort_by(|a, b| s[*b as usize].total_cmp(&s[*a as usize]));
            out.push(order);
        }
    }
    Ok(out)
}

/// The request for one user, and the titles its candidates were shown with.
fn request(
    strategy: Strategy,
    inp: &Inputs<'_>,
    list: &CandidateList,
    order: &[u32],
) -> Result<(Request, Vec<String>), LvlmError> {
    let cfg = inp.cfg;
    let template = inp.templates.of(strategy).ok_or_else(|| LvlmError::Invalid(format!("{strategy} has no prompt")))?;
    let full = inp.ds.history(list.user, Split::Test);
    let history = &full[full.len().saturating_sub(cfg.max_history)..];
    let title = |i: u32| shown_title(&inp.ds.item(i).meta.title, cfg.max_title_words);
    let (titles_flag, images_flag) =
        if strategy.shows_images() { (cfg.modalities.titles(), cfg.modalities.images()) } else { (true, false) };
    let history_text: Vec<String> = history
        .iter()
        .enumerate()
        .map(|(n, &i)| match inp.captions.filter(|_| strategy.uses_captions()).and_then(|c| c.get(i)) {
            Some(caption) => {
                format!("{}. {} (image: {})", n + 1, title(i), caption.split_whitespace().collect::<Vec<_>>().join(" "))
            }
            None => format!("{}. {}", n + 1, title(i)),
        })
        .collect();
    let shown: Vec<String> = order.iter().map(|&i| title(i)).collect();
    let candidate_text: Vec<String> = shown.iter().enumerate().map(|(n, t)| format!("[{}] {t}", n + 1)).collect();
    let k = cfg.list_length.unwrap_or(order.len()).min(order.len());
    let values = [
        ("count", history.len().to_string()),
        ("history", history_text.join("\n")),
        ("n", order.len().to_string()),
        ("candidates", candidate_text.join("\n")),
        ("k", k.to_string()),
    ];
    let flags = [
        ("titles", titles_flag),
        ("images", images_flag),
        ("one_image", images_flag && cfg.images == ImageMode::Concatenated),
        ("per_item", images_flag && cfg.images == ImageMode::PerItem),
    ];
    let prompt = render(template, &values, &flags).map_err(LvlmError::Invalid)?;
    let images = if images_flag { history_images(inp.store, inp.ds, history, cfg.images)? } else { Vec::new() };
    let req = Request { prompt, images, labels: order.len(), list_length: k, max_tokens: cfg.max_tokens };
    Ok((req, shown))
}

/// Runs a prompted strategy with `backend` over the inputs' users.
pub fn run(strategy: Strategy, backend: &dyn Backend, inp: &Inputs<'_>) -> Result<StrategyReport, LvlmError> {
    if strategy.shows_images() && inp.cfg.modalities.images() && !backend.sees_images() {
        return Err(LvlmError::Invalid(format!(
            "{strategy} shows the history's images, and this backbone reads text only (use a vision backbone, \
             or lvlm.modalities: title)"
        )));
    }
    let orders = display_orders(strategy, inp)?;
    let mut requests = Vec::with_capacity(inp.lists.len());
    let mut shown = Vec::with_capacity(inp.lists.len());
    for (list, order) in inp.lists.iter().zip(&orders) {
        let (r, s) = request(strategy, inp, list, order)?;
        requests.push(r);
        shown.push(s);
    }
    let identity = backend.identity();
    let cache = AnswerCache::new(inp.store);
    let hashes: Vec<String> = requests.iter().map(|r| request_hash(&identity, r)).collect();
    let mut replies: Vec<Option<Result<Reply, String>>> = Vec::with_capacity(requests.len());
    for h in &hashes {
        replies.push(if inp.fresh { None } else { cache.get(h)?.map(Ok) });
    }
    let cached: Vec<bool> = replies.iter().map(Option::is_some).collect();
    let pending: Vec<usize> = (0..requests.len()).filter(|&i| replies[i].is_none()).collect();
    let to_send: Vec<Request> = pending.iter().map(|&i| requests[i].clone()).collect();
    let started = Instant::now();
    let cpu_before = crate::telemetry::cpu_seconds();
    if !to_send.is_empty() {
        let mut progress = Progress::new(inp.telemetry, &strategy.to_string(), to_send.len() as u64);
        let mut cache_error = None;
        backend
            .answer(&to_send, &mut |j, result| {
                let i = pending[j];
                replies[i] = Some(match result {
                    Ok(reply) => {
                        if let Err(e) = cache.put(&hashes[i], &identity, &reply) {
                            cache_error.get_or_insert(e);
                        }
                        Ok(reply)
                    }
                    Err(e) => Err(e.to_string()),
                });
                progress.inc(1);
            })
            .map_err(|e| match e {
                BackendError::Fatal(m) | BackendError::Request(m) => LvlmError::Backend(m),
            })?;
        progress.finish();
        if let Some(e) = cache_error {
            return Err(e.into());
        }
    }
    let seconds_answering = started.elapsed().as_secs_f64();
    let cpu_answering = cpu_before.and_then(|b| Some(crate::telemetry::cpu_seconds()? - b));
    let mut sums = MetricSums::new(inp.ks);
    let mut answers = Vec::with_capacity(requests.len());
    for (i, list) in inp.lists.iter().enumerate() {
        let order = &orders[i];
        let (reply, error) = match replies[i].take() {
            Some(Ok(r)) => (Some(r), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, Some("the backend returned no answer".to_string())),
        };
        let parsed = reply.as_ref().map(|r| answer::parse(&r.text, &shown[i]));
        let (p, error) = match parsed {
            Some(Ok(p)) => (p, error),
            Some(Err(e)) => (Parsed::default(), Some(e.to_string())),
            None => (Parsed::default(), error),
        };
        let target_rank =
            p.ranking.iter().position(|&pos| order[pos] == list.target).unwrap_or(order.len().saturating_sub(1));
        sums.add(target_rank);
        let id = |i: u32| inp.ds.item(i).id.clone();
        answers.push(UserAnswer {
            user: inp.ds.user_ids[list.user].clone(),
            target: id(list.target),
            target_rank,
            candidates: order.iter().map(|&c| id(c)).collect(),
            ranking: p.ranking.iter().map(|&pos| id(order[pos])).collect(),
            prompt: requests[i].prompt.clone(),
            images: requests[i].images.len(),
            explanation: p.explanation.clone(),
            answer: reply.as_ref().map(|r| r.text.clone()).unwrap_or_default(),
            error,
            hallucinated: p.hallucinated,
            duplicates: p.duplicates,
            truncated: p.truncated,
            cached: cached[i],
            prompt_tokens: reply.as_ref().map_or(0, |r| r.prompt_tokens),
            completion_tokens: reply.as_ref().map_or(0, |r| r.completion_tokens),
            seconds: reply.as_ref().map_or(0.0, |r| r.seconds),
        });
    }
    let mut cost = cost(&answers, pending.len(), seconds_answering);
    cost.cpu_seconds_per_user = cpu_answering.filter(|_| !pending.is_empty()).map(|c| c / pending.len() as f64);
    cost.backend = backend.stats();
    Ok(StrategyReport { metrics: sums.means(), answers, cost })
}

fn cost(answers: &[UserAnswer], sent: usize, seconds_answering: f64) -> Cost {
    let users = answers.len();
    let request_errors = answers.iter().filter(|a| a.error.is_some() && a.answer.is_empty()).count();
    let parse_failures = answers.iter().filter(|a| a.error.is_some() && !a.answer.is_empty()).count();
    let named: usize = answers.iter().map(|a| a.ranking.len() + a.hallucinated + a.duplicates).sum();
    let hallucinated: usize = answers.iter().map(|a| a.hallucinated).sum();
    let answered: Vec<&UserAnswer> = answers.iter().filter(|a| !a.answer.is_empty()).collect();
    let mean = |f: &dyn Fn(&UserAnswer) -> usize| {
        if answered.is_empty() {
            0.0
        } else {
            answered.iter().map(|a| f(a) as f64).sum::<f64>() / answered.len() as f64
        }
    };
    let pct = |n: usize, of: usize| if of == 0 { 0.0 } else { 100.0 * n as f64 / of as f64 };
    Cost {
        users,
        requests_sent: sent,
        answers_cached: answers.iter().filter(|a| a.cached).count(),
        request_errors,
        parse_failures,
        parse_failure_pct: pct(parse_failures + request_errors, users),
        named_items: named,
        hallucinated_items: hallucinated,
        hallucination_pct: pct(hallucinated, named),
        duplicate_items: answers.iter().map(|a| a.duplicates).sum(),
        prompt_tokens_mean: mean(&|a| a.prompt_tokens),
        completion_tokens_mean: mean(&|a| a.completion_tokens),
        seconds_per_user: if sent == 0 {
            answers.iter().map(|a| a.seconds).sum::<f64>() / users.max(1) as f64
        } else {
            seconds_answering / sent as f64
        },
        seconds_answering,
        cpu_seconds_per_user: None,
        backend: serde_json::Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Negatives;

    #[test]
    fn candidate_lists_come_from_the_snapshot_or_the_stored_negatives() {
        let mut ds = crate::data::candidates::tests::ds();
        let cfg = LvlmConfig::default();
        assert!(candidate_lists(&ds, &cfg).unwrap_err().to_string().contains("has no fixed candidate lists"));
        ds.candidates = vec![CandidateList { user: 1, candidates: vec![8, 1], target: 1 }];
        assert_eq!(candidate_lists(&ds, &cfg).unwrap(), ds.candidates);
        // sampled:2: each user's test target and its first two stored negatives, shuffled by the seed.
        ds.negatives = Negatives { per_user: 3, valid: vec![0; 6], test: vec![6, 7, 8, 2, 3, 5] };
        let sampled = LvlmConfig { protocol: Protocol::Sampled(2), ..LvlmConfig::default() };
        let lists = candidate_lists(&ds, &sampled).unwrap();
        let sorted = |l: &CandidateList| {
            let mut c = l.candidates.clone();
            c.sort();
            (l.user, c, l.target)
        };
        assert_eq!(sorted(&lists[0]), (0, vec![4, 6, 7], 4));
        assert_eq!(sorted(&lists[1]), (1, vec![1, 2, 3], 1));
        assert_eq!(lists, candidate_lists(&ds, &sampled).unwrap(), "seeded");
        let one = LvlmConfig { users: crate::eval::UserSample::Count(1), ..sampled.clone() };
        assert_eq!(candidate_lists(&ds, &one).unwrap().len(), 1);
        let too_many = LvlmConfig { protocol: Protocol::Sampled(4), ..LvlmConfig::default() };
        assert!(candidate_lists(&ds, &too_many).unwrap_err().to_string().contains("stores 3 negatives"));
    }

    struct Fixed(Vec<f32>);
    impl Scorer for Fixed {
        fn score(&self, h: &[&[u32]]) -> crate::model::Result<Vec<f32>> {
            Ok(h.iter().flat_map(|_| self.0.clone()).collect())
        }
    }

    #[test]
    fn rerankers_list_the_candidates_in_the_base_models_order_ties_in_list_order() {
        let ds = crate::data::candidates::tests::ds();
        //                      item: 0    1    2    3    4    5    6    7    8
        let base = Fixed(vec![0.0, 0.1, 0.9, 0.5, 0.7, 0.7, 0.2, 0.8, 0.3]);
        let lists = [CandidateList { user: 0, candidates: vec![5, 8, 4, 7], target: 4 }];
        let (store, templates, tel) =
            (Store::open("memory://").unwrap(), Templates::builtin(), TelemetryConfig::default());
        let inp = Inputs {
            ds: &ds,
            store: &store,
            cfg: &LvlmConfig::default(),
            templates: &templates,
            ks: &[1],
            lists: &lists,
            base: Some(&base),
            captions: None,
            telemetry: &tel,
            fresh: false,
        };
        assert_eq!(display_orders(Strategy::S5, &inp).unwrap(), vec![vec![7, 5, 4, 8]]);
        assert_eq!(display_orders(Strategy::S4, &inp).unwrap(), vec![vec![5, 8, 4, 7]]);
        // The prompt lists them numbered in that order, after the history (oldest first).
        let (req, shown) = request(Strategy::S5, &inp, &lists[0], &[7, 5, 4, 8]).unwrap();
        assert_eq!((req.labels, req.list_length), (4, 4));
        let titles: Vec<String> = [7, 5, 4, 8].iter().map(|&i| shown_title(&ds.item(i).meta.title, None)).collect();
        assert_eq!(shown, titles);
        let at = |needle: &str| req.prompt.find(needle).unwrap_or_else(|| panic!("no {needle:?} in {}", req.prompt));
        assert!(at("1. no title") < at("3. no title") && at("3. no title") < at("[1] no title"));
        assert!(at("[1] no title") < at("[4] no title") && !req.prompt.contains("[5]"));
    }

    #[test]
    fn titles_are_shown_whole_or_cut_to_words() {
        assert_eq!(shown_title("  Red   lamp, 2 pack ", None), "Red lamp, 2 pack");
        assert_eq!(shown_title("Red lamp, 2 pack", Some(2)), "Red lamp,");
        assert_eq!(shown_title("", None), "no title");
    }

    fn answer(rank: usize, ranking: usize, error: Option<&str>, text: &str, hallucinated: usize) -> UserAnswer {
        UserAnswer {
            user: "u".into(),
            target: "t".into(),
            target_rank: rank,
            candidates: vec![],
            ranking: vec!["x".into(); ranking],
            prompt: String::new(),
            images: 0,
            explanation: String::new(),
            answer: text.into(),
            error: error.map(String::from),
            hallucinated,
            duplicates: 0,
            truncated: false,
            cached: false,
            prompt_tokens: 100,
            completion_tokens: 10,
            seconds: 1.0,
        }
    }

    #[test]
    fn cost_counts_failures_and_hallucinations_per_entry() {
        let answers = [
            answer(0, 3, None, "{..}", 1),
            answer(29, 0, Some("no list"), "I think lipstick", 0),
            answer(29, 0, Some("HTTP 500"), "", 0),
            answer(2, 4, None, "{..}", 0),
        ];
        let c = cost(&answers, 4, 8.0);
        assert_eq!((c.request_errors, c.parse_failures, c.named_items, c.hallucinated_items), (1, 1, 8, 1));
        assert_eq!((c.parse_failure_pct, c.hallucination_pct), (50.0, 12.5));
        assert_eq!((c.seconds_per_user, c.prompt_tokens_mean), (2.0, 100.0));
    }
}
