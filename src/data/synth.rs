//! `illmrec synth`: a seeded synthetic catalog in the Amazon Reviews 2018 layout.
//!
//! Items belong to latent categories. A category fixes an item's look (shape, colour, texture of its
//! PNG image) and vocabulary (title noun, brands, description words), so image and text encoders can
//! pick up the signal. Users move between categories with a sequential habit: mostly to the category's
//! fixed successor, sometimes staying, sometimes back to a personal favourite; within a category they
//! pick items by a skewed popularity. Pop sees only the popularity; sequence models can learn the habit.
//!
//! Item i and user u draw from their own random streams, so a catalog of 10K items starts with the same
//! 5K items as a catalog of 5K (catalog growth reuses their features).

use std::io::Write;
use std::path::Path;

use rand::Rng as _;
use serde_json::json;

use super::config::SynthConfig;
use super::error::{DataError, Result};
use crate::seed::stream;
use crate::telemetry::{Progress, TelemetryConfig};

const SHAPES: usize = 6;
const TEXTURES: usize = 4;
const NOUNS: &[&str] = &[
    "Lamp", "Mug", "Backpack", "Notebook", "Sneaker", "Kettle", "Brush", "Jacket", "Speaker", "Bottle", "Candle",
    "Pillow", "Watch", "Scarf", "Bowl", "Chair", "Puzzle", "Helmet", "Blender", "Easel", "Racket", "Tent", "Guitar",
    "Camera",
];
const ADJECTIVES: &[&str] =
    &["Classic", "Compact", "Deluxe", "Eco", "Light", "Pro", "Smart", "Vintage", "Modern", "Sturdy", "Soft", "Bold"];
const SYLLABLES: &[&str] =
    &["ka", "lo", "mi", "ren", "to", "va", "zu", "no", "shi", "pe", "ri", "dan", "qu", "sol", "tek", "mar"];
const MATERIALS: &[&str] =
    &["cotton", "steel", "bamboo", "ceramic", "leather", "glass", "oak", "wool", "nylon", "copper"];
const COLOUR_NAMES: &[&str] =
    &["red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet", "magenta", "rose"];

/// What was written, for the terminal.
#[derive(Debug)]
pub struct SynthReport {
    pub items: usize,
    pub users: usize,
    pub interactions: usize,
    pub images: usize,
}

struct Category {
    noun: &'static str,
    shape: usize,
    texture: usize,
    hue: f64,
    successor: usize,
    brands: Vec<String>,
    material: &'static str,
}

fn categories(cfg: &SynthConfig) -> Vec<Category> {
    let n = cfg.categories;
    (0..n)
        .map(|c| {
            let mut rng = stream(cfg.seed, "synth/category", c as u64);
            let brands = (0..4)
                .map(|_| {
                    let s: String = (0..2 + rng.random_range(0..2))
                        .map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())])
                        .collect();
                    let mut ch = s.chars();
                    ch.next().map(|f| f.to_ascii_uppercase().to_string() + ch.as_str()).unwrap_or_default()
                })
                .collect();
            Category {
                noun: NOUNS[c % NOUNS.len()],
                shape: c % SHAPES,
                texture: (c / SHAPES) % TEXTURES,
                // Golden-ratio spacing keeps neighbouring categories' colours apart.
                hue: (c as f64 * 0.618_033_988_75).fract(),
                // A fixed permutation-like successor: the sequential habit users follow.
                successor: (c * 7 + 3) % n,
                brands,
                material: MATERIALS[rng.random_range(0..MATERIALS.len())],
            }
        })
        .collect()
}

struct SynthItem {
    asin: String,
    category: usize,
    weight: f64,
}

fn item(cfg: &SynthConfig, i: usize) -> SynthItem {
    let mut rng = stream(cfg.seed, "synth/item", i as u64);
    let category = rng.random_range(0..cfg.categories);
    // Skewed popularity: a few items get most of the picks.
    let weight = rng.random::<f64>().powi(4) + 0.002;
    SynthItem { asin: format!("S{i:07}"), category, weight }
}

pub fn generate(cfg: &SynthConfig, telemetry: &TelemetryConfig) -> Result<SynthReport> {
    let out = &cfg.out;
    let images_dir = out.join("images");
    std::fs::create_dir_all(&images_dir).map_err(|source| DataError::Io { file: images_dir.clone(), source })?;
    let cats = categories(cfg);
    let items: Vec<SynthItem> = (0..cfg.items).map(|i| item(cfg, i)).collect();

    let mut meta = gzip_writer(&out.join("meta.jsonl.gz"))?;
    let mut progress = Progress::new(telemetry, "items", cfg.items as u64);
    let mut images = 0;
    for (i, it) in items.iter().enumerate() {
        let c = &cats[it.category];
        let mut rng = stream(cfg.seed, "synth/item-text", i as u64);
        let colour = COLOUR_NAMES[((c.hue * COLOUR_NAMES.len() as f64) as usize) % COLOUR_NAMES.len()];
        let adjective = ADJECTIVES[rng.random_range(0..ADJECTIVES.len())];
        let brand = &c.brands[rng.random_range(0..c.brands.len())];
        let title = format!(
            "{brand} {adjective} {colour} {} {}{}",
            c.noun,
            (b'A' + rng.random_range(0..26u8)) as char,
            rng.random_range(100..1000)
        );
        let has_image = rng.random::<f64>() >= cfg.missing_image_rate;
        let image_url: Vec<String> = if has_image { vec![format!("images/{}.png", it.asin)] } else { Vec::new() };
        let record = json!({
            "asin": it.asin,
            "title": title,
            "brand": brand,
            "category": ["Synthetic", format!("{}s", c.noun)],
            "feature": [format!("Made of {}", c.material), format!("{} finish", colour)],
            "description": [format!("A {} {} {} by {brand}, built from {} for everyday use.", adjective.to_lowercase(), colour, c.noun.to_lowercase(), c.material)],
            "imageURL": image_url,
            "imageURLHighRes": image_url,
        });
        writeln!(meta, "{record}").map_err(|source| DataError::Io { file: out.join("meta.jsonl.gz"), source })?;
        if has_image {
            let path = images_dir.join(format!("{}.png", it.asin));
            draw(cfg, c, i)
                .save(&path)
                .map_err(|e| DataError::BadFile { file: path.clone(), reason: e.to_string() })?;
            images += 1;
        }
        progress.inc(1);
    }
    progress.finish();
    finish_gzip(meta, &out.join("meta.jsonl.gz"))?;

    // Per-category cumulative popularity for weighted picks.
    let mut by_cat: Vec<(Vec<usize>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); cfg.categories];
    for (i, it) in items.iter().enumerate() {
        let (ids, cum) = &mut by_cat[it.category];
        let total = cum.last().copied().unwrap_or(0.0) + it.weight;
        ids.push(i);
        cum.push(total);
    }
    let reviews_path = out.join("reviews.jsonl.gz");
    let mut reviews = gzip_writer(&reviews_path)?;
    let mut interactions = 0;
    for u in 0..cfg.users {
        let mut rng = stream(cfg.seed, "synth/user", u as u64);
        let favourites: Vec<usize> = (0..3).map(|_| rng.random_range(0..cfg.categories)).collect();
        let len = rng.random_range(cfg.min_sequence..=cfg.max_sequence);
        let mut cat = favourites[0];
        let mut time: i64 = 1_400_000_000 + rng.random_range(0..50_000_000);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..len {
            // Up to a few tries to find an item the user has not had yet.
            let pick = (0..8).find_map(|_| {
                let (ids, cum) = &by_cat[cat];
                let total = *cum.last()?;
                let x = rng.random::<f64>() * total;
                let i = ids[cum.partition_point(|&c| c <= x).min(ids.len() - 1)];
                (!seen.contains(&i)).then_some(i)
            });
            if let Some(i) = pick {
                seen.insert(i);
                let record = json!({"reviewerID": format!("U{u:07}"), "asin": items[i].asin, "unixReviewTime": time, "overall": 5.0});
                writeln!(reviews, "{record}").map_err(|source| DataError::Io { file: reviews_path.clone(), source })?;
                interactions += 1;
            }
            time += rng.random_range(3_600..2_600_000);
            let r = rng.random::<f64>();
            cat = if r < 0.65 {
                cats[cat].successor
            } else if r < 0.85 {
                cat
            } else {
                favourites[rng.random_range(0..favourites.len())]
            };
        }
    }
    finish_gzip(reviews, &reviews_path)?;
    Ok(SynthReport { items: cfg.items, users: cfg.users, interactions, images })
}

fn gzip_writer(path: &Path) -> Result<flate2::write::GzEncoder<std::io::BufWriter<std::fs::File>>> {
    let f = std::fs::File::create(path).map_err(|source| DataError::Io { file: path.to_path_buf(), source })?;
    Ok(flate2::write::GzEncoder::new(std::io::BufWriter::new(f), flate2::Compression::fast()))
}

fn finish_gzip(w: flate2::write::GzEncoder<std::io::BufWriter<std::fs::File>>, path: &Path) -> Result<()> {
    w.finish().and_then(|mut b| b.flush()).map_err(|source| DataError::Io { file: path.to_path_buf(), source })
}

/// An item's picture: its category's shape in its category's colour and texture, with per-item jitter
/// in position, size, shade and background noise.
fn draw(cfg: &SynthConfig, c: &Category, item: usize) -> image::RgbImage {
    let s = cfg.image_size;
    let mut rng = stream(cfg.seed, "synth/item-image", item as u64);
    let size = s as f64;
    let (cx, cy) = (size * (0.5 + rng.random_range(-0.1..0.1)), size * (0.5 + rng.random_range(-0.1..0.1)));
    let radius = size * rng.random_range(0.26..0.36);
    let hue = (c.hue + rng.random_range(-0.03..0.03)).rem_euclid(1.0);
    let value = rng.random_range(0.75..1.0);
    let fg = hsv(hue, 0.85, value);
    let fg_dark = hsv(hue, 0.9, value * 0.45);
    let bg_base: f64 = rng.random_range(215.0..245.0);
    image::RgbImage::from_fn(s, s, |x, y| {
        let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
        let (dx, dy) = ((px - cx) / radius, (py - cy) / radius);
        let noise = rng.random_range(-8.0..8.0);
        if inside(c.shape, dx, dy) {
            let stripe = match c.texture {
                0 => false,
                1 => ((py / (size / 10.0)) as i64) % 2 == 0,
                2 => (((px / (size / 8.0)) as i64) + ((py / (size / 8.0)) as i64)) % 2 == 0,
                _ => {
                    let cell = size / 8.0;
                    let (mx, my) = ((px % cell) / cell - 0.5, (py % cell) / cell - 0.5);
                    mx * mx + my * my < 0.08
                }
            };
            let col = if stripe { fg_dark } else { fg };
            image::Rgb(col.map(|v| (v + noise).clamp(0.0, 255.0) as u8))
        } else {
            let g = (bg_base + noise).clamp(0.0, 255.0) as u8;
            image::Rgb([g, g, g])
        }
    })
}

fn inside(shape: usize, dx: f64, dy: f64) -> bool {
    match shape {
        0 => dx * dx + dy * dy <= 1.0,                                                     // disc
        1 => dx.abs() <= 0.85 && dy.abs() <= 0.85,                                         // square
        2 => dy <= 0.8 && dy >= -1.0 + 2.0 * dx.abs() * 0.9,                               // triangle
        3 => dx.abs() + dy.abs() <= 1.0,                                                   // diamond
        4 => (0.45..=1.0).contains(&(dx * dx + dy * dy)),                                  // ring
        _ => (dx.abs() <= 0.3 && dy.abs() <= 1.0) || (dy.abs() <= 0.3 && dx.abs() <= 1.0), // cross
    }
}

fn hsv(h: f64, s: f64, v: f64) -> [f64; 3] {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - f * s), v * (1.0 - (1.0 - f) * s));
    let (r, g, b) = match (i as i64).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [r * 255.0, g * 255.0, b * 255.0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(out: &Path, items: usize, users: usize) -> SynthConfig {
        SynthConfig {
            out: out.to_path_buf(),
            items,
            users,
            categories: 6,
            seed: 3,
            image_size: 32,
            min_sequence: 5,
            max_sequence: 8,
            missing_image_rate: 0.1,
        }
    }

    #[test]
    fn same_seed_same_files_and_a_larger_catalog_keeps_the_first_items() {
        let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let quiet = TelemetryConfig { progress: crate::telemetry::ProgressMode::Off, ..Default::default() };
        generate(&cfg(a.path(), 60, 20), &quiet).unwrap();
        generate(&cfg(b.path(), 60, 20), &quiet).unwrap();
        for f in ["meta.jsonl.gz", "reviews.jsonl.gz", "images/S0000007.png"] {
            if a.path().join(f).exists() {
                assert_eq!(std::fs::read(a.path().join(f)).unwrap(), std::fs::read(b.path().join(f)).unwrap(), "{f}");
            }
        }
        let r = generate(&cfg(c.path(), 120, 20), &quiet).unwrap();
        assert!(r.images < 120 && r.images > 80, "missing_image_rate 0.1 leaves most images: {}", r.images);
        let meta = |d: &Path| {
            let (bytes, _) = crate::data::ingest::read_source(&d.join("meta.jsonl.gz")).unwrap();
            String::from_utf8(bytes).unwrap().lines().map(str::to_string).collect::<Vec<_>>()
        };
        assert_eq!(meta(a.path())[..], meta(c.path())[..60]);
    }

    #[test]
    fn categories_differ_in_look() {
        let d = tempfile::tempdir().unwrap();
        let cfg = cfg(d.path(), 60, 1);
        let cats = categories(&cfg);
        let mean = |img: &image::RgbImage| {
            let n = img.pixels().len() as f64;
            img.pixels().fold([0.0; 3], |a, p| [a[0] + p[0] as f64 / n, a[1] + p[1] as f64 / n, a[2] + p[2] as f64 / n])
        };
        let (m0, m1) = (mean(&draw(&cfg, &cats[0], 1)), mean(&draw(&cfg, &cats[1], 2)));
        let dist: f64 = m0.iter().zip(m1).map(|(a, b)| (a - b).abs()).sum();
        assert!(dist > 10.0, "mean colours of two categories should differ: {m0:?} vs {m1:?}");
    }
}
