//! History images for the vision strategies: each item's picture from the snapshot fitted into a
//! square tile on white, either as one image per item or side by side in purchase order, oldest on the
//! left (S1's composite image). An item without a picture is a grey tile, so positions still match
//! the titles.

use image::{imageops, DynamicImage, Rgb, RgbImage};

use super::backend::Image;
use crate::data::{snapshot, Dataset};
use crate::store::{key, Store, StoreError};

/// Side of a tile, in pixels.
pub const TILE: u32 = 224;
/// White space between tiles of the composite image.
const GAP: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("item `{item}`: image {key} does not decode: {reason}")]
    Decode { item: String, key: String, reason: String },
    #[error("cannot encode a PNG: {0}")]
    Encode(String),
}

/// How history images go into a prompt (`lvlm.images`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageMode {
    /// One image: the pictures side by side, oldest on the left.
    #[default]
    Concatenated,
    /// One image per item, in order.
    PerItem,
}

/// The tile of one item.
fn tile(store: &Store, ds: &Dataset, item: u32) -> Result<RgbImage, ImageError> {
    let it = ds.item(item);
    let Some(rel) = &it.image else {
        return Ok(RgbImage::from_pixel(TILE, TILE, Rgb([200, 200, 200])));
    };
    let k = key(&[&snapshot::dir(&ds.name, &ds.key), rel]);
    let bytes = store.get_immutable(&k)?;
    let img = image::load_from_memory(&bytes).map_err(|e| ImageError::Decode {
        item: it.id.clone(),
        key: k.clone(),
        reason: e.to_string(),
    })?;
    Ok(fit(&img))
}

/// `img` scaled to fit a tile, centred on white.
fn fit(img: &DynamicImage) -> RgbImage {
    let scaled = img.resize(TILE, TILE, imageops::FilterType::Triangle).to_rgb8();
    let mut out = RgbImage::from_pixel(TILE, TILE, Rgb([255, 255, 255]));
    let (x, y) = ((TILE - scaled.width()) / 2, (TILE - scaled.height()) / 2);
    imageops::overlay(&mut out, &scaled, x as i64, y as i64);
    out
}

/// The tiles side by side, `GAP` pixels apart.
pub fn side_by_side(tiles: &[RgbImage]) -> RgbImage {
    let n = tiles.len() as u32;
    let width = (n * TILE + n.saturating_sub(1) * GAP).max(1);
    let mut out = RgbImage::from_pixel(width, TILE, Rgb([255, 255, 255]));
    for (i, t) in tiles.iter().enumerate() {
        imageops::overlay(&mut out, t, (i as u32 * (TILE + GAP)) as i64, 0);
    }
    out
}

pub fn png(img: &RgbImage) -> Result<Image, ImageError> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png).map_err(|e| ImageError::Encode(e.to_string()))?;
    Ok(Image::from_png(bytes.into_inner()))
}

/// The history's images as a prompt carries them.
pub fn history_images(store: &Store, ds: &Dataset, history: &[u32], mode: ImageMode) -> Result<Vec<Image>, ImageError> {
    let tiles = history.iter().map(|&i| tile(store, ds, i)).collect::<Result<Vec<_>, _>>()?;
    match mode {
        ImageMode::Concatenated => Ok(vec![png(&side_by_side(&tiles))?]),
        ImageMode::PerItem => tiles.iter().map(png).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_go_left_to_right_in_order_with_white_gaps() {
        let red = RgbImage::from_pixel(TILE, TILE, Rgb([255, 0, 0]));
        // A wide picture is scaled down and centred vertically on white.
        let blue = fit(&DynamicImage::ImageRgb8(RgbImage::from_pixel(2 * TILE, TILE, Rgb([0, 0, 255]))));
        assert_eq!(*blue.get_pixel(TILE / 2, TILE / 2), Rgb([0, 0, 255]));
        assert_eq!(*blue.get_pixel(TILE / 2, 2), Rgb([255, 255, 255]));
        let row = side_by_side(&[red, blue]);
        assert_eq!((row.width(), row.height()), (2 * TILE + GAP, TILE));
        assert_eq!(*row.get_pixel(10, TILE / 2), Rgb([255, 0, 0]));
        assert_eq!(*row.get_pixel(TILE + GAP / 2, TILE / 2), Rgb([255, 255, 255]));
        assert_eq!(*row.get_pixel(TILE + GAP + 10, TILE / 2), Rgb([0, 0, 255]));
        let encoded = png(&row).unwrap();
        let back = image::load_from_memory(&encoded.png).unwrap().to_rgb8();
        assert_eq!(back, row);
    }
}
