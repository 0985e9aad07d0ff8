//! The backward through the frozen LLM: every trainable tensor gets a gradient, the LLM's weights get
//! none, and the analytic gradient agrees with finite differences on the tiny model in f64.

use super::batch::{encode, EncodedBatch};
use super::*;
use crate::data::ingest::ItemMeta;
use crate::data::prompt::{PromptBuilder, Property};
use crate::data::Item;
use crate::model::layers::normal_tensor;
use crate::model::llm::{LlmSource, TinyLlmConfig};

const ITEMS: usize = 6;

fn items() -> Vec<Item> {
    (1..=ITEMS as u32)
        .map(|i| {
            let meta = ItemMeta { title: format!("Item {i}"), brand: "Kalo".into(), ..Default::default() };
            Item { index: i, id: format!("i{i}"), meta, image: None }
        })
        .collect()
}

/// Random image (8-d) and text (6-d) features; item 3 has no image.
fn features(dtype: DType) -> Features {
    let mut out = Features::new();
    for (kind, dim) in [(FeatureKind::Image, 8), (FeatureKind::Text, 6)] {
        let mut rng = crate::seed::stream(5, kind.name(), 0);
        let mut values =
            normal_tensor((ITEMS + 1) * dim, 1.0, &mut rng, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let mut present = vec![true; ITEMS + 1];
        present[0] = false;
        if kind == FeatureKind::Image {
            present[3] = false;
            values[3 * dim..4 * dim].iter_mut().for_each(|v| *v = 0.0);
        }
        out.insert(kind, FeatureMatrix::new(kind, dim, &values, &present, dtype, &Device::Cpu).unwrap());
    }
    out
}

fn cfg() -> IllmRecConfig {
    IllmRecConfig {
        retrieval: vec![FeatureKind::Image, FeatureKind::Text],
        adaptor_hidden: 16,
        head_dim: 8,
        ..Default::default()
    }
}

struct Setup {
    llm: Llm,
    model: IllmRec,
    feats: Features,
    retrieval: EncodedBatch,
    alignment: EncodedBatch,
}

fn setup(dtype: DType, cfg: IllmRecConfig) -> Setup {
    let llm = Llm::load(&LlmSource::Tiny(TinyLlmConfig::default()), dtype, &Device::Cpu).unwrap();
    let feats = features(dtype);
    let model =
        IllmRec::new(&cfg, Variant::Image, &llm, &FeatureMatrix::dims(&feats), &mut crate::seed::stream(1, "init", 0))
            .unwrap();
    let items = items();
    let b = PromptBuilder { variant: Variant::Image, max_description_words: 10 };
    let histories: [Vec<&Item>; 2] = [vec![&items[0], &items[2]], vec![&items[1], &items[3], &items[4]]];
    let enc = |p| encode(&llm, &p).unwrap();
    // The shared template opening goes through the LLM's prefix cache, as in training (not when the
    // input embeddings are trained).
    let split = model.caches_prefix();
    let retrieval = EncodedBatch::new(&histories.iter().map(|h| enc(b.retrieval(h))).collect::<Vec<_>>(), split);
    let alignment = EncodedBatch::new(
        &histories.iter().map(|h| enc(b.alignment(h, &items[5], Property::Brand, 1))).collect::<Vec<_>>(),
        split,
    );
    assert_eq!(retrieval.prefix.is_empty(), !split);
    Setup { llm, model, feats, retrieval, alignment }
}

fn loss(s: &Setup) -> Tensor {
    loss_with(s, &[1, 3], RetrievalLoss::Bce)
}

/// L_RERI (targets 6 and 5, `negatives` split evenly between the two users) + L_RISA.
fn loss_with(s: &Setup, negatives: &[u32], kind: RetrievalLoss) -> Tensor {
    let h = s.model.user_states(&s.llm, &s.retrieval, &s.feats, Graph::Keep).unwrap();
    let reri = s.model.retrieval_loss(&h, &[6, 5], negatives, negatives.len() / 2, kind, &s.feats).unwrap();
    let risa = s.model.alignment_loss(&s.llm, &s.alignment, &s.feats).unwrap();
    (reri + risa).unwrap()
}

#[test]
fn every_trainable_tensor_gets_a_finite_nonzero_gradient_and_the_llm_none() {
    let s = setup(DType::F32, cfg());
    let before: Vec<f32> = s.llm.model.embedding_matrix().flatten_all().unwrap().to_vec1().unwrap();
    let grads = loss(&s).backward().unwrap();
    for (name, v) in s.model.vars() {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(g.iter().all(|x| x.is_finite()), "{name}: non-finite gradient");
        assert!(g.iter().any(|&x| x != 0.0), "{name}: zero gradient");
    }
    assert!(grads.get(s.llm.model.embedding_matrix()).is_none(), "the frozen LLM must get no gradient");
    // A plain gradient step on every trainable tensor touches nothing of the LLM.
    for (_, v) in s.model.vars() {
        let g = grads.get(v.as_tensor()).unwrap();
        v.set(&(v.as_tensor() - g.affine(1e-2, 0.0).unwrap()).unwrap()).unwrap();
    }
    let after: Vec<f32> = s.llm.model.embedding_matrix().flatten_all().unwrap().to_vec1().unwrap();
    assert!(before == after, "LLM weights changed");
}

#[test]
fn tuning_input_embeddings_adds_them_to_the_trainable_set() {
    let s = setup(DType::F32, IllmRecConfig { train_input_embeddings: true, ..cfg() });
    let grads = loss(&s).backward().unwrap();
    let (_, e) = s.model.vars().iter().find(|(n, _)| n == "input_embeddings").unwrap();
    let g: Vec<f32> = grads.get(e.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(g.iter().any(|&x| x != 0.0));
}

/// Largest relative difference between the analytic gradient and central finite differences, over
/// one coordinate of each kind of trainable tensor: upstream of the LLM (adaptor, fallback, [REC])
/// and downstream of it (heads).
fn finite_difference_check(s: &Setup, loss: impl Fn(&Setup) -> Tensor) -> f64 {
    let grads = loss(s).backward().unwrap();
    let mut worst: f64 = 0.0;
    for (name, coord) in [
        ("adaptor.w1", 5),
        ("adaptor.b2", 3),
        ("fallback_adaptor.w2", 17),
        ("rec", 7),
        ("user_head.image.w1", 2),
        ("item_head.text.b1", 4),
    ] {
        let (_, var) = s.model.vars().iter().find(|(n, _)| n == name).unwrap();
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()[coord];
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[coord] += delta;
            var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap()).unwrap();
            let l = loss(s).to_scalar::<f64>().unwrap();
            var.set(&Tensor::from_vec(base.clone(), var.as_tensor().shape(), &Device::Cpu).unwrap()).unwrap();
            l
        };
        let eps = 1e-6;
        let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let rel = (numeric - analytic).abs() / numeric.abs().max(1e-4);
        worst = worst.max(rel);
        assert!(rel < 1e-4, "{name}[{coord}]: analytic {analytic} vs numeric {numeric}");
    }
    worst
}

#[test]
fn gradient_matches_finite_differences_through_the_frozen_llm() {
    let worst = finite_difference_check(&setup(DType::F64, cfg()), loss);
    eprintln!("dot + BCE: largest relative difference analytic vs finite differences: {worst:.2e}");
    // The cosine similarity with a sampled softmax over three negatives per user (one of them,
    // item 3, without an image feature: masked out of the image head's softmax).
    let cosine = IllmRecConfig { similarity: Similarity::Cosine, temperature: 0.2, ..cfg() };
    let worst = finite_difference_check(&setup(DType::F64, cosine), |s| {
        loss_with(s, &[1, 3, 4, 2, 3, 6], RetrievalLoss::Softmax)
    });
    eprintln!("cosine + softmax: largest relative difference analytic vs finite differences: {worst:.2e}");
}

#[test]
fn with_one_negative_the_softmax_loss_is_the_logistic_loss_of_the_margin() {
    // -log(e^p / (e^p + e^n)) = log(1 + e^(n - p)): check it through the model on one head.
    let c = IllmRecConfig { retrieval: vec![FeatureKind::Text], ..cfg() };
    let s = setup(DType::F64, c);
    let h = s.model.user_states(&s.llm, &s.retrieval, &s.feats, Graph::Keep).unwrap();
    let got = s
        .model
        .retrieval_loss(&h, &[6, 5], &[1, 2], 1, RetrievalLoss::Softmax, &s.feats)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let embs = s.model.item_embeddings(&s.feats).unwrap();
    let sc = s.model.scores(&h, &embs, &s.feats).unwrap().to_vec2::<f64>().unwrap();
    let want = ((sc[0][1] - sc[0][6]).exp().ln_1p() + (sc[1][2] - sc[1][5]).exp().ln_1p()) / 2.0;
    assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    // And the BCE with one negative: softplus(-p) + softplus(n), averaged over users.
    let bce = s
        .model
        .retrieval_loss(&h, &[6, 5], &[1, 2], 1, RetrievalLoss::Bce, &s.feats)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let sp = |x: f64| x.exp().ln_1p();
    let want = (sp(-sc[0][6]) + sp(sc[0][1]) + sp(-sc[1][5]) + sp(sc[1][2])) / 2.0;
    assert!((bce - want).abs() < 1e-9, "{bce} vs {want}");
}

#[test]
fn scoring_states_carry_no_graph_and_equal_the_training_ones() {
    for backbone in [Backbone::Llm, Backbone::Gru] {
        let s = setup(DType::F32, IllmRecConfig { backbone, ..cfg() });
        let kept = s.model.user_states(&s.llm, &s.retrieval, &s.feats, Graph::Keep).unwrap();
        let dropped = s.model.user_states(&s.llm, &s.retrieval, &s.feats, Graph::Drop).unwrap();
        assert!(kept.track_op(), "{backbone:?}: training states lead back to the trainable tensors");
        assert!(!dropped.track_op(), "{backbone:?}: scoring states must hold no graph (nor its activations)");
        let diff = (kept - dropped).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{backbone:?}");
    }
}

#[test]
fn scores_average_over_the_feature_types_an_item_has() {
    let s = setup(DType::F32, cfg());
    let h = s.model.user_states(&s.llm, &s.retrieval, &s.feats, Graph::Keep).unwrap();
    let embs = s.model.item_embeddings(&s.feats).unwrap();
    let scores = s.model.scores(&h, &embs, &s.feats).unwrap().to_vec2::<f32>().unwrap();
    let per_kind: Vec<Vec<Vec<f32>>> = s
        .model
        .user_heads
        .iter()
        .zip(&embs)
        .map(|((_, u), e)| u.forward(&h).unwrap().matmul(&e.t().unwrap()).unwrap().to_vec2::<f32>().unwrap())
        .collect();
    for row in 0..2 {
        // Item 3 has no image: its score is its text score alone.
        assert!((scores[row][3] - per_kind[1][row][3]).abs() < 1e-5);
        let both = (per_kind[0][row][4] + per_kind[1][row][4]) / 2.0;
        assert!((scores[row][4] - both).abs() < 1e-5);
    }
}

#[test]
fn the_gru_backbone_reads_each_users_item_tokens_in_order_and_trains_without_risa() {
    let s = setup(DType::F32, IllmRecConfig { backbone: Backbone::Gru, ..cfg() });
    let h = s.model.user_states(&s.llm, &s.retrieval, &s.feats, Graph::Keep).unwrap();
    assert_eq!(h.dims(), &[2, s.llm.hidden_size()]);
    // User 0's state is the GRU over its two item tokens alone: the same as a batch of that user.
    let gru = s.model.gru.as_ref().unwrap();
    let tokens = s.model.item_tokens(&[1, 3], &s.feats, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let alone = gru.last_states(&tokens, &Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let diff = (h.narrow(0, 0, 1).unwrap() - alone).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    let reri = s.model.retrieval_loss(&h, &[6, 5], &[1, 3], 1, RetrievalLoss::Bce, &s.feats).unwrap();
    let grads = reri.backward().unwrap();
    for name in ["gru.w_x", "gru.w_h", "adaptor.w1"] {
        let v = &s.model.vars().iter().find(|(n, _)| n == name).unwrap().1;
        let g: Vec<f32> = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(g.iter().any(|&x| x != 0.0), "{name} learns");
    }
    let err = s.model.alignment_loss(&s.llm, &s.alignment, &s.feats).unwrap_err().to_string();
    assert!(err.contains("risa_weight: 0"), "{err}");
}

#[test]
fn the_default_backbone_leaves_the_recorded_config_as_it_was() {
    // Resumes compare the recorded config: runs trained before `backbone` existed must still match.
    let llm = serde_json::to_value(cfg()).unwrap();
    assert!(llm.get("backbone").is_none(), "{llm}");
    let gru = serde_json::to_value(IllmRecConfig { backbone: Backbone::Gru, ..cfg() }).unwrap();
    assert_eq!(gru["backbone"], "gru");
}
