use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p
}

const DATA: &str = "data:\n  source:\n    recbole: {dir: x, name: ml-100k}\n";

#[test]
fn presets_merge_key_by_key_and_the_job_wins() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "configs/small.yaml", "model:\n  sasrec: {hidden: 32, blocks: 1}\ntrain:\n  sasrec: {epochs: 7}\n");
    let job = write(
        d.path(),
        "jobs/j.yaml",
        &format!("name: j\ninclude: [../configs/small.yaml]\n{DATA}model:\n  sasrec: {{blocks: 3}}\n"),
    );
    let cfg = JobConfig::load(&job).unwrap();
    assert_eq!(cfg.model.sasrec.hidden, 32);
    assert_eq!(cfg.model.sasrec.blocks, 3);
    assert_eq!(cfg.train.sasrec.epochs, 7);
    assert_eq!(cfg.data.k_core, 5, "defaults fill what no file sets");
}

#[test]
fn unknown_key_names_the_file_that_set_it_and_the_key() {
    let d = tempfile::tempdir().unwrap();
    let preset = write(d.path(), "p.yaml", "train:\n  sasrec: {epoch: 3}\n");
    let job = write(d.path(), "j.yaml", &format!("name: j\ninclude: p.yaml\n{DATA}"));
    let err = JobConfig::load(&job).unwrap_err();
    let ConfigError::Key { file, key, message } = &err else { panic!("{err}") };
    assert_eq!(file, &preset);
    assert_eq!(key, "train.sasrec.epoch");
    assert!(message.contains("unknown field"), "{message}");

    let job = write(d.path(), "j2.yaml", &format!("name: j\n{DATA}  kcore: 3\n"));
    let err = JobConfig::load(&job).unwrap_err().to_string();
    assert!(err.contains("j2.yaml") && err.contains("`data.kcore`"), "{err}");
}

#[test]
fn wrong_type_and_invalid_value_name_the_key() {
    let d = tempfile::tempdir().unwrap();
    let job = write(d.path(), "j.yaml", &format!("name: j\n{DATA}  negatives: many\n"));
    let err = JobConfig::load(&job).unwrap_err().to_string();
    assert!(err.contains("key `data.negatives`"), "{err}");

    let job = write(d.path(), "k.yaml", &format!("name: j\n{DATA}  k_core: 0\n"));
    let err = JobConfig::load(&job).unwrap_err().to_string();
    assert!(err.contains("k.yaml") && err.contains("key `data.k_core`: must be at least 1"), "{err}");

    let job = write(d.path(), "e.yaml", &format!("name: j\n{DATA}eval:\n  protocols: [full, sampled:x]\n"));
    let err = JobConfig::load(&job).unwrap_err().to_string();
    assert!(err.contains("eval.protocols") && err.contains("sampled:x"), "{err}");

    let job = write(
        d.path(),
        "m.yaml",
        &format!("name: j\n{DATA}train:\n  illmrec:\n    validation: {{min_delta: -0.01}}\n"),
    );
    let err = JobConfig::load(&job).unwrap_err().to_string();
    assert!(err.contains("train.illmrec.validation.min_delta") && err.contains("-0.01"), "{err}");
}

#[test]
fn missing_section_include_cycle_and_bad_yaml_are_reported() {
    let d = tempfile::tempdir().unwrap();
    let job = write(d.path(), "j.yaml", "name: j\n");
    let err = JobConfig::load(&job).unwrap_err().to_string();
    assert!(err.contains("missing field `data`"), "{err}");

    write(d.path(), "a.yaml", "include: b.yaml\n");
    let b = write(d.path(), "b.yaml", "include: a.yaml\n");
    let err = JobConfig::load(&b).unwrap_err();
    assert!(matches!(err, ConfigError::IncludeCycle { .. }), "{err}");

    let job = write(d.path(), "y.yaml", "name: [unclosed\n");
    let err = JobConfig::load(&job).unwrap_err().to_string();
    assert!(err.contains("y.yaml: invalid YAML"), "{err}");
}

/// Every YAML file below `dir`, recursively.
fn yaml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out
}

#[test]
fn shipped_jobs_and_presets_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let jobs = yaml_files(&root.join("jobs"));
    assert!(jobs.len() > 8, "{jobs:?}");
    for path in jobs.into_iter().chain(yaml_files(&root.join("configs"))) {
        // Presets and an ablation's base.yaml are fragments: they must parse as YAML mappings.
        if path.starts_with(root.join("configs")) || path.ends_with("base.yaml") {
            let v: Value = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            assert!(v.is_mapping(), "{}", path.display());
        } else {
            JobConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn a_later_file_replaces_a_kind_choice_instead_of_merging_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("base.yaml"),
        "name: a\ndata: {source: {recbole: {dir: d, name: n}}, k_core: 3}\nmodel: {llm: {tiny: {seed: 2}}}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("job.yaml"),
        "include: [base.yaml]\nmodel: {llm: {gguf: {file: m.gguf}}}\ndata: {k_core: 4}\n",
    )
    .unwrap();
    let job = JobConfig::load(&dir.path().join("job.yaml")).unwrap();
    assert_eq!(job.model.llm, crate::model::llm::LlmSource::Gguf { file: "m.gguf".into() });
    assert_eq!(job.data.k_core, 4);
    assert!(matches!(job.data.source, crate::data::SourceConfig::Recbole { .. }));
}

#[test]
fn the_gru_backbone_refuses_an_alignment_loss() {
    let d = tempfile::tempdir().unwrap();
    let job = write(d.path(), "j.yaml", &format!("name: j\n{DATA}model:\n  illmrec: {{backbone: gru}}\n"));
    let err = JobConfig::load(&job).unwrap_err().to_string();
    assert!(err.contains("illmrec.risa_weight") && err.contains("backbone: gru"), "{err}");
    let ok = write(
        d.path(),
        "k.yaml",
        &format!("name: k\n{DATA}model:\n  illmrec: {{backbone: gru}}\ntrain:\n  illmrec: {{risa_weight: 0}}\n"),
    );
    assert!(JobConfig::load(&ok).is_ok());
}
