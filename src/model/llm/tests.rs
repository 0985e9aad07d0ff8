use candle_core::{DType, Device, Tensor, Var};

use super::*;

fn tiny(dtype: DType) -> Llm {
    Llm::load(&LlmSource::Tiny(TinyLlmConfig::default()), dtype, &Device::Cpu).unwrap()
}

#[test]
fn tiny_tokenizer_is_deterministic_and_round_trips() {
    let (a, b) = (tiny::tokenizer(1024).unwrap(), tiny::tokenizer(1024).unwrap());
    assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
    let llm = tiny(DType::F32);
    let text = "{Title: Kalo Classic red Lamp B123, Visual representation: ";
    let ids = llm.encode(text).unwrap();
    assert!(ids.len() < text.len() / 2, "BPE merges common words: {} tokens", ids.len());
    assert_eq!(llm.decode(&ids).unwrap(), text);
    // Text outside the training corpus still encodes, byte by byte at worst.
    assert_eq!(llm.decode(&llm.encode("Zürich ☃").unwrap()).unwrap(), "Zürich ☃");
}

/// Sum of hidden states times fixed random weights: a scalar that depends on every output.
fn probe_loss(llm: &Llm, x: &Tensor, probe: &Tensor) -> Tensor {
    (llm.model.forward_embeds(x).unwrap() * probe).unwrap().sum_all().unwrap()
}

#[test]
fn gradient_with_respect_to_input_embeddings_matches_finite_differences() {
    let llm = tiny(DType::F64);
    let dev = Device::Cpu;
    let h = llm.hidden_size();
    let mut rng = crate::seed::stream(3, "fd", 0);
    let x0 = crate::model::layers::normal_tensor((2, 5, h), 1.0, &mut rng, &dev).unwrap().to_dtype(DType::F64).unwrap();
    let probe =
        crate::model::layers::normal_tensor((2, 5, h), 1.0, &mut rng, &dev).unwrap().to_dtype(DType::F64).unwrap();
    let x = Var::from_tensor(&x0).unwrap();
    let grads = probe_loss(&llm, x.as_tensor(), &probe).backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let base = x0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let eps = 1e-5;
    let mut worst: f64 = 0.0;
    // Coordinates in both rows, early and late positions.
    for idx in [0, 7, h + 3, 4 * h + 1, 5 * h + 2, 9 * h + h - 1] {
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[idx] += delta;
            let xt = Tensor::from_vec(v, (2, 5, h), &dev).unwrap();
            probe_loss(&llm, &xt, &probe).to_scalar::<f64>().unwrap()
        };
        let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let rel = (numeric - g[idx]).abs() / numeric.abs().max(1e-3);
        worst = worst.max(rel);
        assert!(rel < 1e-5, "coordinate {idx}: analytic {} vs numeric {numeric}", g[idx]);
    }
    eprintln!("largest relative difference analytic vs finite differences: {worst:.2e}");
}

#[test]
fn causal_positions_ignore_later_tokens_and_right_padding() {
    let llm = tiny(DType::F32);
    let a = llm.embed_ids(vec![5, 9, 13, 2, 2], 1).unwrap();
    let b = llm.embed_ids(vec![5, 9, 13, 77, 101], 1).unwrap();
    let (ha, hb) = (llm.model.forward_embeds(&a).unwrap(), llm.model.forward_embeds(&b).unwrap());
    let first3 = |t: &Tensor| t.narrow(1, 0, 3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(first3(&ha), first3(&hb));
}

#[test]
fn tiny_model_saved_as_a_hugging_face_directory_loads_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    tiny::save_hf_dir(&TinyLlmConfig::default(), dir.path()).unwrap();
    let hf = Llm::load(&LlmSource::Hf { dir: dir.path().to_path_buf() }, DType::F32, &Device::Cpu).unwrap();
    let mem = tiny(DType::F32);
    assert_eq!((hf.bos, hf.eos), (mem.bos, mem.eos));
    let ids = mem.encode("The title of the next item").unwrap();
    assert_eq!(hf.encode("The title of the next item").unwrap(), ids);
    let x = mem.embed_ids(ids.clone(), 1).unwrap();
    let out = |l: &Llm| l.model.forward_embeds(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(out(&hf), out(&mem));
}

#[test]
fn missing_model_files_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = Llm::load(&LlmSource::Hf { dir: dir.path().to_path_buf() }, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    let err = Llm::load(&LlmSource::Gguf { file: dir.path().join("none.gguf") }, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("none.gguf"), "{err}");
}

#[test]
fn a_cached_prefix_gives_the_full_computations_outputs_and_gradients() {
    // Two rows of 4 and 2 tokens continuing a 3-token prefix: packed with the prefix cached, against
    // each row computed in full (prefix included) on its own, in f64.
    let llm = tiny(DType::F64);
    let (dev, h, p, lens) = (Device::Cpu, llm.hidden_size(), 3, [4usize, 2]);
    let mut rng = crate::seed::stream(4, "prefix", 0);
    let mut normal = |n: usize| {
        crate::model::layers::normal_tensor((n, h), 1.0, &mut rng, &dev).unwrap().to_dtype(DType::F64).unwrap()
    };
    let prefix = normal(p);
    let x = Var::from_tensor(&normal(6)).unwrap();
    let probe = normal(6);
    let cache = llm.model.prefix_cache(&prefix).unwrap();
    let packed = llm.model.forward_packed(x.as_tensor(), &lens, Some(&cache)).unwrap();
    let g_packed = (&packed * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let g_packed = g_packed.get(x.as_tensor()).unwrap();
    let mut start = 0;
    for &len in &lens {
        let row = Var::from_tensor(&x.as_tensor().narrow(0, start, len).unwrap()).unwrap();
        let full = Tensor::cat(&[&prefix, row.as_tensor()], 0).unwrap();
        let out = llm.model.forward_packed(&full, &[p + len], None).unwrap().narrow(0, p, len).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
        };
        assert!(diff(&out, &packed.narrow(0, start, len).unwrap()) < 1e-10, "outputs of the row at {start}");
        let g = (&out * &probe.narrow(0, start, len).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        let d = diff(g.get(row.as_tensor()).unwrap(), &g_packed.narrow(0, start, len).unwrap());
        assert!(d < 1e-10, "gradient of the row at {start}: {d:.2e}");
        start += len;
    }
}

#[test]
fn one_node_layers_match_the_op_by_op_graph_outputs_and_gradients() {
    // Two rows of 5 and 3 tokens after a 2-token prefix, through every layer: the layers as single
    // graph nodes with their own backward (`layer.rs`) against the same ops as separate nodes.
    for (dtype, bf16, tol) in [(DType::F64, false, 1e-11), (DType::F32, false, 1e-5), (DType::F32, true, 1e-5)] {
        let mut llm = tiny(dtype);
        if bf16 && !llm.model.use_bf16_matmuls().unwrap() {
            eprintln!("no bf16 products on this CPU: that case is not checked");
            continue;
        }
        let (dev, h, lens) = (Device::Cpu, llm.hidden_size(), [5usize, 3]);
        let mut rng = crate::seed::stream(5, "layer", 0);
        let mut normal = |n: usize| {
            crate::model::layers::normal_tensor((n, h), 1.0, &mut rng, &dev).unwrap().to_dtype(dtype).unwrap()
        };
        let cache = llm.model.prefix_cache(&normal(2)).unwrap();
        let (x0, probe) = (normal(8), normal(8));
        let run = |fused: bool| {
            let x = Var::from_tensor(&x0).unwrap();
            let positions = llm.model.positions(8, &lens, Some(&cache)).unwrap();
            let out = if fused {
                llm.model.fused_layers(x.as_tensor(), positions, &lens, Some(&cache))
            } else {
                llm.model.graph_layers(x.as_tensor(), positions, &lens, Some(&cache), None)
            }
            .unwrap();
            let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            (flat(&out), flat(grads.get(x.as_tensor()).unwrap()))
        };
        let ((out1, g1), (out2, g2)) = (run(true), run(false));
        let rel = |a: &[f64], b: &[f64]| {
            let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
            a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
        };
        assert!(rel(&out1, &out2) < tol, "{dtype:?} bf16 {bf16}: outputs differ by {:.2e}", rel(&out1, &out2));
        assert!(rel(&g1, &g2) < tol, "{dtype:?} bf16 {bf16}: gradients differ by {:.2e}", rel(&g1, &g2));
        assert!(g1.iter().any(|v| *v != 0.0));
    }
}
