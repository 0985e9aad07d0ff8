//! I-LLMRec end to end on a small synthetic image catalog and the tiny LLM: features, training,
//! exact resume, evaluation, and the prompt variants.

use illmrec::config::JobConfig;
use illmrec::data::prompt::Variant;
use illmrec::data::{prepare::prepare, snapshot, Split};
use illmrec::eval::{evaluate, Plan, Protocol};
use illmrec::pipeline::train_job;
use illmrec::store::Store;
use illmrec::train::illmrec::{fit, load_scorer, TrainOptions};
use illmrec::train::runs::Which;

const JOB: &str = r#"
name: tiny
data:
  synth: {out: RAW, items: 240, users: 160, categories: 6, seed: 5, image_size: 24, min_sequence: 6, max_sequence: 10}
  source:
    amazon: {reviews: RAW/reviews.jsonl.gz, meta: RAW/meta.jsonl.gz, images: RAW/images}
  k_core: 2
  negatives: 29
features:
  image: {tiny_siglip: {seed: 1, image_size: 24, patch_size: 8, hidden: 32}}
  text: {tiny_bert: {seed: 1, hidden: 32}}
model:
  llm: {tiny: {seed: 1, layers: 2, hidden: 64}}
  illmrec: {retrieval: [image, text], adaptor_hidden: 32, head_dim: 32, max_history: 6}
train:
  illmrec: {batch_size: 4, lr: 0.001, max_steps: 6, checkpoint_every: 2}
telemetry:
  progress: off
"#;

fn setup() -> (tempfile::TempDir, JobConfig, Store) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    let text = JOB.replace("RAW", &raw.display().to_string());
    let job = JobConfig::from_str_with_base(&text, std::path::Path::new("job.yaml"), dir.path()).unwrap();
    illmrec::data::synth::generate(job.data.synth.as_ref().unwrap(), &job.telemetry).unwrap();
    let store = Store::open("memory://").unwrap();
    prepare(&job.name, &job.data, &store, &job.telemetry).unwrap();
    let ds = snapshot::load(&store, &job.name).unwrap();
    let r = illmrec::features::compute(&job.features, &ds, &store, "none", &job.telemetry, &candle_core::Device::Cpu)
        .unwrap();
    assert_eq!(r.0[0].computed + r.0[0].reused, ds.num_items() - r.0[0].without_input);
    (dir, job, store)
}

fn single() -> illmrec::distributed::Guarded {
    illmrec::distributed::init(&illmrec::distributed::DistConfig::default()).unwrap()
}

fn weights(store: &Store) -> Vec<u8> {
    let ckpt = illmrec::train::runs::load_latest(store, "tiny-illmrec").unwrap().unwrap();
    ckpt.file("weights.safetensors").unwrap().to_vec()
}

/// `train --auto-resume` of the job's I-LLMRec run, on one rank.
fn resume(job: &JobConfig, store: &Store) -> illmrec::train::illmrec::FitReport {
    fit(&train_job(job), store, Variant::Image, TrainOptions { resume: true, ..TrainOptions::default() }, &mut single())
        .unwrap()
}

#[test]
fn resumed_training_equals_uninterrupted_training_bit_for_bit() {
    let (_dir, mut job, store) = setup();
    // Validation every 2 steps with patience 1: the early-stopping state must cross the resume.
    job.train.illmrec.validate_every = Some(2);
    job.train.illmrec.patience = Some(1);
    let straight = fit(&train_job(&job), &store, Variant::Image, TrainOptions::default(), &mut single()).unwrap();
    assert_eq!((straight.first_step, straight.total_steps), (0, 6));
    assert!(!straight.validations.is_empty(), "the run validated");
    let w_straight = weights(&store);
    let best_straight = illmrec::train::runs::load(&store, "tiny-illmrec", Which::Best).unwrap().unwrap();
    let stopped = fit(
        &train_job(&job),
        &store,
        Variant::Image,
        TrainOptions { stop_after: Some(3), ..TrainOptions::default() },
        &mut single(),
    )
    .unwrap();
    assert_eq!(stopped.last_step, 3);
    let resumed = resume(&job, &store);
    assert_eq!((resumed.resumed_from, resumed.last_step), (Some(3), straight.last_step));
    let losses =
        |r: &illmrec::train::illmrec::FitReport| r.log.iter().map(|l| l.losses.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&straight), losses(&resumed), "the resumed run's log carries the same losses");
    let decisions = |r: &illmrec::train::illmrec::FitReport| {
        r.validations.iter().map(|v| (v.step, v.value.to_bits(), v.improved)).collect::<Vec<_>>()
    };
    assert_eq!(decisions(&straight), decisions(&resumed), "the same validations, values and verdicts");
    assert_eq!((straight.best, straight.stopped_early), (resumed.best, resumed.stopped_early));
    assert!(w_straight == weights(&store), "resumed weights differ from uninterrupted ones");
    // BEST names the best validation's checkpoint, in both runs the same weights; `eval` and
    // `recommend` score with it by default.
    let best = illmrec::train::runs::load(&store, "tiny-illmrec", Which::Best).unwrap().unwrap();
    assert_eq!(Some(best.step), straight.best.map(|b| b.0));
    assert!(best.file("weights.safetensors").unwrap() == best_straight.file("weights.safetensors").unwrap());
    let ds = snapshot::load(&store, "tiny").unwrap();
    let scorer = load_scorer(&train_job(&job), &store, &ds, Variant::Image, Which::Best).unwrap();
    let loaded = scorer.session().model.to_host().unwrap();
    let tf = illmrec::tensorfile::TensorFile::parse(best.file("weights.safetensors").unwrap(), "best").unwrap();
    for t in &loaded {
        assert_eq!(tf.f32(&t.name).unwrap().1, t.values, "{} is not BEST's", t.name);
    }
    // Training moved the loss.
    assert!(straight.log.iter().all(|l| l.losses.loss.is_finite() && l.grad_norm > 0.0));
}

#[test]
fn a_run_that_stopped_early_resumes_to_nothing_more() {
    let (_dir, mut job, store) = setup();
    // No validation can beat the first by more than 1: with patience 1 the run stops after the
    // second validation, at step 4 of 6.
    job.train.illmrec.validate_every = Some(2);
    job.train.illmrec.patience = Some(1);
    job.train.illmrec.validation.min_delta = 1.0;
    let stopped = fit(&train_job(&job), &store, Variant::Image, TrainOptions::default(), &mut single()).unwrap();
    assert_eq!((stopped.last_step, stopped.stopped_early, stopped.best.map(|b| b.0)), (4, true, Some(2)));
    let w_stopped = weights(&store);
    // `--auto-resume` after the stop (a requeued job, a rerun script) trains no further step.
    let again = resume(&job, &store);
    assert_eq!((again.resumed_from, again.first_step, again.last_step), (Some(4), 4, 4));
    assert!(again.stopped_early && again.log.len() == stopped.log.len());
    assert_eq!(again.best, stopped.best);
    assert!(weights(&store) == w_stopped, "the checkpoint moved");
}

#[test]
fn a_resume_repoints_a_best_that_a_cut_short_commit_left_behind() {
    let (_dir, mut job, store) = setup();
    // The first validation (step 2) is the best for good: none beats it by 1.
    job.train.illmrec.validate_every = Some(2);
    job.train.illmrec.validation.min_delta = 1.0;
    let stop = TrainOptions { stop_after: Some(2), ..TrainOptions::default() };
    fit(&train_job(&job), &store, Variant::Image, stop, &mut single()).unwrap();
    // A commit that moved LATEST and died before BEST.
    store.delete("runs/tiny-illmrec/checkpoints/BEST").unwrap();
    // The resume trains on to step 6; without BEST, `eval` would score LATEST (step 6).
    let resumed = resume(&job, &store);
    assert_eq!((resumed.resumed_from, resumed.last_step, resumed.best.map(|b| b.0)), (Some(2), 6, Some(2)));
    assert!(store.get_string("runs/tiny-illmrec/checkpoints/BEST").unwrap().is_some(), "BEST is back");
    let best = illmrec::train::runs::load(&store, "tiny-illmrec", Which::Best).unwrap().unwrap();
    assert_eq!(best.step, 2);
}

#[test]
fn a_fresh_run_reports_its_own_validations_only() {
    let (_dir, mut job, store) = setup();
    job.train.illmrec.validate_every = Some(2);
    let stop = || TrainOptions { stop_after: Some(2), ..TrainOptions::default() };
    fit(&train_job(&job), &store, Variant::Image, stop(), &mut single()).unwrap();
    let curve = || illmrec::train::illmrec::loss_curve(&store, "tiny-illmrec").unwrap();
    assert_eq!(curve().validation.len(), 1);
    // The same run started afresh without validation: no validation panel from the first one.
    job.train.illmrec.validate_every = Some(0);
    fit(&train_job(&job), &store, Variant::Image, stop(), &mut single()).unwrap();
    assert!(curve().validation.is_empty(), "{:?}", curve().validation);
    assert_eq!(curve().points.len(), 2);
}

#[test]
fn bench_step_exports_the_inputs_and_losses_of_the_steps_training_takes() {
    let (dir, job, store) = setup();
    let trained = fit(&train_job(&job), &store, Variant::Image, TrainOptions::default(), &mut single()).unwrap();
    let out = dir.path().join("export");
    illmrec::bench::step(&job, &store, Variant::Image, 2, 1, &mut single(), Some(&out)).unwrap();
    let read = |f: &str| -> serde_json::Value { serde_json::from_slice(&std::fs::read(out.join(f)).unwrap()).unwrap() };
    let config = read("config.json");
    let bytes = std::fs::read(out.join("tensors.safetensors")).unwrap();
    let tensors = illmrec::tensorfile::TensorFile::parse(&bytes, "export").unwrap();
    let vars: Vec<&str> = config["vars"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(vars.contains(&"rec") && vars.contains(&"adaptor.w1"), "{vars:?}");
    for name in vars.iter().copied().chain(["feature.image", "present.image", "feature.text"]) {
        assert!(tensors.f32(name).is_ok(), "{name} missing from the export");
    }
    // The three steps are the first three steps of training: same prompts, same losses, bit for bit.
    for i in 0..3 {
        let step = read(&format!("step-{i}.json"));
        let logged = &step["logged"];
        assert_eq!(logged["step"], i + 1);
        assert_eq!(logged["loss"].as_f64().unwrap().to_bits(), trained.log[i].losses.loss.to_bits(), "step {i}");
        let b = &step["retrieval"];
        let lens: u64 = b["lens"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap()).sum();
        assert_eq!(lens as usize, b["ids"].as_array().unwrap().len(), "packed rows without padding");
        assert_eq!(b["rec_pos"].as_array().unwrap().len(), 4, "one [REC] per row of the batch of 4");
        assert_eq!(step["negatives"].as_array().unwrap().len(), 4);
        assert!(!step["alignment"]["label_ids"].as_array().unwrap().is_empty(), "RISA's answers");
    }
}

#[test]
fn every_variant_trains_and_scores_all_protocols() {
    let (_dir, job, store) = setup();
    let ds = snapshot::load(&store, "tiny").unwrap();
    let users: Vec<usize> = (0..ds.num_users().min(24)).collect();
    let mut tokens = Vec::new();
    for variant in [Variant::Image, Variant::Title, Variant::Description, Variant::ImageDescription] {
        let r = fit(&train_job(&job), &store, variant, TrainOptions::default(), &mut single()).unwrap();
        tokens.push((variant, r.tokens_per_item));
        let scorer = load_scorer(&train_job(&job), &store, &ds, variant, Which::Best).unwrap();
        let protocols = [Protocol::Full, Protocol::Sampled(29)];
        let plan = Plan { split: Split::Test, protocols: &protocols, ks: &[1, 5, 10], users: &users, batch_size: 8 };
        let m = evaluate(&scorer, &ds, &plan, None).unwrap();
        for metrics in &m {
            let h10 = metrics.get("hit@10").unwrap();
            assert!((0.0..=1.0).contains(&h10));
        }
    }
    // Tokens per item: title < title + image token < title + description < all three.
    let t = |v: Variant| tokens.iter().find(|(x, _)| *x == v).unwrap().1;
    assert!(t(Variant::Title) < t(Variant::Image), "{tokens:?}");
    assert!(t(Variant::Image) < t(Variant::Description), "{tokens:?}");
    assert!(t(Variant::Description) < t(Variant::ImageDescription), "{tokens:?}");
}

#[test]
fn a_grown_catalog_reuses_features_warm_starts_and_is_scored_by_the_old_model() {
    use illmrec::model::Scorer;
    let (_dir, job, store) = setup();
    let old = snapshot::load(&store, "tiny").unwrap();
    fit(&train_job(&job), &store, Variant::Image, TrainOptions::default(), &mut single()).unwrap();

    // The catalog grows: same seed, more items and users; prepared under the same dataset name.
    let mut grown_job = job.clone();
    let synth = illmrec::data::SynthConfig { items: 360, users: 220, ..job.data.synth.clone().unwrap() };
    illmrec::data::synth::generate(&synth, &job.telemetry).unwrap();
    grown_job.data.synth = Some(synth);
    let prepared = prepare("tiny", &grown_job.data, &store, &job.telemetry).unwrap();
    assert_eq!(prepared.manifest.parent.as_deref(), Some(old.key.as_str()), "the new version names its parent");
    let grown = snapshot::load(&store, "tiny").unwrap();
    assert!(grown.num_items() > old.num_items());

    // Features: only items not seen before are computed.
    let known: std::collections::HashSet<&str> = old.items.iter().map(|i| i.id.as_str()).collect();
    let carried = grown.items.iter().filter(|i| known.contains(i.id.as_str())).count();
    let r =
        illmrec::features::compute(&job.features, &grown, &store, "none", &job.telemetry, &candle_core::Device::Cpu)
            .unwrap();
    for kind in &r.0 {
        assert_eq!((kind.reused, kind.computed), (carried, grown.num_items() - carried), "{:?}", kind.kind);
    }

    // The old model, not retrained, scores every item of the grown catalog, new ones from their features.
    let scorer = load_scorer(&train_job(&job), &store, &grown, Variant::Image, Which::Best).unwrap();
    let history = &grown.sequences[0][..3];
    let scores = scorer.score(&[history]).unwrap();
    assert_eq!(scores.len(), grown.num_items() + 1);
    let new_scores: Vec<f32> = grown
        .items
        .iter()
        .enumerate()
        .filter(|(_, it)| !known.contains(it.id.as_str()))
        .map(|(i, _)| scores[i + 1])
        .collect();
    assert!(!new_scores.is_empty() && new_scores.iter().all(|s| s.is_finite()));
    assert!(new_scores.iter().any(|s| *s != new_scores[0]), "new items must be told apart by their features");

    // Warm start: a new run that begins with the old run's weights and optimizer state.
    grown_job.name = "tiny-grown".into();
    grown_job.data.dataset = Some("tiny".into());
    let warm = TrainOptions { from: Some("tiny-illmrec".into()), stop_after: Some(0), ..TrainOptions::default() };
    fit(&train_job(&grown_job), &store, Variant::Image, warm, &mut single()).unwrap();
    let a = illmrec::train::runs::load_latest(&store, "tiny-illmrec").unwrap().unwrap();
    let b = illmrec::train::runs::load_latest(&store, "tiny-grown-illmrec").unwrap().unwrap();
    for file in ["weights.safetensors", "optimizer.safetensors"] {
        assert!(a.file(file).unwrap() == b.file(file).unwrap(), "{file} was not carried over");
    }
    assert_eq!(b.state["warm_start_from"], "tiny-illmrec");
    let stop = TrainOptions { from: Some("tiny-illmrec".into()), stop_after: Some(2), ..TrainOptions::default() };
    fit(&train_job(&grown_job), &store, Variant::Image, stop, &mut single()).unwrap();
    // Requeued (`train --from RUN --auto-resume` again), the warm-started run resumes its own
    // checkpoint and still names where it started.
    let trained = resume(&grown_job, &store);
    assert_eq!((trained.first_step, trained.last_step), (2, 6));
    assert!(trained.log.iter().all(|l| l.losses.loss.is_finite()));
    let latest = illmrec::train::runs::load_latest(&store, "tiny-grown-illmrec").unwrap().unwrap();
    assert_eq!(latest.state["warm_start_from"], "tiny-illmrec");
}

/// A catalog where the next item follows from the last one: 40 items in a ring, every user walks
/// 8 steps of it from a seeded start. Items are equally popular, so Pop is near chance; a model
/// that reads the history's item tokens can learn "the item after the last one" from their features.
fn ring_catalog(dir: &std::path::Path) -> JobConfig {
    use rand::{Rng as _, SeedableRng as _};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut seqs = String::new();
    for u in 0..160 {
        let start: u32 = rng.random_range(0..40);
        let items: Vec<String> = (0..8).map(|k| ((start + k) % 40 + 1).to_string()).collect();
        seqs += &format!("u{u} {}\n", items.join(" "));
    }
    std::fs::write(dir.join("seq.txt"), seqs).unwrap();
    let table: String = (1..=40).map(|i| format!("{i}\tProduct number {i} of the ring\n")).collect();
    std::fs::write(dir.join("items.tsv"), format!("item_id\ttitle\n{table}")).unwrap();
    let job = format!(
        r#"
name: ring
data:
  source:
    sequences: {{file: {dir}/seq.txt, items: {dir}/items.tsv}}
  k_core: 1
  negatives: 29
features:
  text: {{tiny_bert: {{seed: 1, hidden: 32}}}}
model:
  llm: {{tiny: {{seed: 1, layers: 2, hidden: 64}}}}
  illmrec: {{token_feature: text, fallback_feature: null, retrieval: [text], adaptor_hidden: 32, head_dim: 32, max_history: 4}}
train:
  illmrec: {{epochs: 15, batch_size: 8, lr: 0.003, risa_weight: 0.0, checkpoint_every: 1000, validate_every: 0}}
telemetry:
  progress: off
"#,
        dir = dir.display()
    );
    JobConfig::from_str_with_base(&job, std::path::Path::new("ring.yaml"), dir).unwrap()
}

#[test]
fn training_learns_a_next_item_that_its_features_predict() {
    let dir = tempfile::tempdir().unwrap();
    let job = ring_catalog(dir.path());
    let store = Store::open("memory://").unwrap();
    prepare(&job.name, &job.data, &store, &job.telemetry).unwrap();
    let ds = snapshot::load(&store, "ring").unwrap();
    illmrec::features::compute(&job.features, &ds, &store, "none", &job.telemetry, &candle_core::Device::Cpu).unwrap();
    let pop = illmrec::model::pop::Pop::fit(ds.num_items(), (0..ds.num_users()).map(|u| ds.train(u)));
    let users: Vec<usize> = (0..ds.num_users()).collect();
    let protocols = [Protocol::Sampled(29)];
    let plan = Plan { split: Split::Test, protocols: &protocols, ks: &[1, 5, 10], users: &users, batch_size: 32 };
    let hit5 =
        |scorer: &dyn illmrec::model::Scorer| evaluate(scorer, &ds, &plan, None).unwrap()[0].get("hit@5").unwrap();
    let pop_hit5 = hit5(&pop);
    for (label, extra) in [
        ("the paper's loss (dot product, BCE, one negative)", ""),
        ("cosine similarity, sampled softmax over 8 negatives", "cosine"),
    ] {
        let mut job = job.clone();
        if extra == "cosine" {
            job.model.illmrec.similarity = illmrec::model::illmrec::Similarity::Cosine;
            job.train.illmrec.reri_loss = illmrec::model::illmrec::RetrievalLoss::Softmax;
            job.train.illmrec.negatives = 8;
        }
        let r = fit(&train_job(&job), &store, Variant::Image, TrainOptions::default(), &mut single()).unwrap();
        let reri: Vec<f64> = r.log.iter().map(|l| l.losses.reri).collect();
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
        let (first, last) = (mean(&reri[..20]), mean(&reri[reri.len() - 20..]));
        let scorer = load_scorer(&train_job(&job), &store, &ds, Variant::Image, Which::Latest).unwrap();
        let h = hit5(&scorer);
        eprintln!("{label}: L_RERI {first:.3} -> {last:.3}; test Hit@5 at 1+29 {h:.3} vs Pop {pop_hit5:.3}");
        assert!(last < 0.7 * first, "{label}: the loss must fall ({first:.3} -> {last:.3})");
        assert!(h > pop_hit5 + 0.3, "{label}: Hit@5 {h:.3} must clearly beat Pop's {pop_hit5:.3}");
    }
}

#[test]
fn resume_refuses_a_checkpoint_trained_with_other_settings() {
    let (_dir, job, store) = setup();
    let stop = TrainOptions { stop_after: Some(2), ..TrainOptions::default() };
    fit(&train_job(&job), &store, Variant::Image, stop, &mut single()).unwrap();
    let mut changed = job.clone();
    changed.train.illmrec.lr *= 2.0;
    let resume = TrainOptions { resume: true, ..TrainOptions::default() };
    let err = fit(&train_job(&changed), &store, Variant::Image, resume.clone(), &mut single()).err().unwrap();
    assert!(err.to_string().contains("was trained with different settings (train)"), "{err}");
    // The same settings resume.
    let r = fit(&train_job(&job), &store, Variant::Image, resume, &mut single()).unwrap();
    assert_eq!(r.resumed_from, Some(2));
}
