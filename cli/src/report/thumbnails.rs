//! The gallery's thumbnails: each source image fetched and made into a small JPEG data
//! URI by the same code that prepares images for the model (`shotlabel_core::prepare`:
//! its decode limits, EXIF orientation, transparency on white, resizing and encoder).

use std::collections::HashMap;

use futures_util::stream::{self, StreamExt};
use shotlabel_core::ports::{ObjectStore, StoreError};
use shotlabel_core::prepare::{self, DecodeLimits, JpegSettings, PrepareError};
use shotlabel_core::records::LabelRecord;

/// The longest side of a thumbnail, in pixels.
const THUMBNAIL_SIDE: u32 = 240;
/// Taller pages are cut to their top (height at most 5/4 of the width) before shrinking,
/// so a full-page capture shows as its first screen rather than a sliver.
const TALLEST_ASPECT: (u32, u32) = (5, 4);
/// Thumbnails are looked at, not read by a model, and a page holds hundreds: halved
/// chroma and optimised Huffman tables keep the page small.
const THUMBNAIL_JPEG: JpegSettings = JpegSettings {
    quality: 75,
    full_chroma: false,
    optimize_huffman: true,
};
/// Thumbnails made at once; each holds a decoded image, and decoding is CPU-bound.
const CONCURRENT_THUMBNAILS: usize = 8;

/// A gallery entry: the thumbnail, or why there is none.
#[derive(Debug, Clone)]
pub(super) enum Thumb {
    Image {
        thumbnail: Thumbnail,
        /// The source changed after it was labelled.
        changed: bool,
    },
    Placeholder {
        reason: String,
    },
}

impl Thumb {
    pub(super) fn is_image(&self) -> bool {
        matches!(self, Thumb::Image { .. })
    }
}

/// A JPEG data URI and its size.
#[derive(Debug, Clone)]
pub(super) struct Thumbnail {
    pub data_uri: String,
    pub width: u32,
    pub height: u32,
    /// The upright source's size when only its top is shown.
    pub cropped_from: Option<(u32, u32)>,
}

/// Fetches the chosen labels' source images and makes their thumbnails, keyed by index
/// into `labels`. Nothing here fails the report: a source that cannot be read or
/// decoded becomes a placeholder with the reason.
pub(super) async fn fetch_thumbnails<S: ObjectStore>(
    store: &S,
    labels: &[(String, LabelRecord)],
    chosen: &[usize],
) -> HashMap<usize, Thumb> {
    stream::iter(chosen.iter().copied())
        .map(|i| async move {
            let source = &labels[i].1.source;
            let thumb = match store.get(&source.bucket, &source.key).await {
                Ok(object) => {
                    let changed = !source.etag.is_empty() && object.etag != source.etag;
                    let made = tokio::task::spawn_blocking(move || {
                        make_thumbnail(&object.body, THUMBNAIL_SIDE)
                    })
                    .await;
                    match made {
                        Ok(Ok(thumbnail)) => Thumb::Image { thumbnail, changed },
                        Ok(Err(e)) => Thumb::Placeholder {
                            reason: placeholder_reason(&e),
                        },
                        Err(e) => Thumb::Placeholder {
                            reason: format!("the thumbnail could not be made: {e}"),
                        },
                    }
                }
                Err(StoreError::NotFound { .. }) => Thumb::Placeholder {
                    reason: "the source image is no longer in the bucket".into(),
                },
                Err(e) => Thumb::Placeholder {
                    reason: e.to_string(),
                },
            };
            (i, thumb)
        })
        .buffer_unordered(CONCURRENT_THUMBNAILS)
        .collect()
        .await
}

/// Decodes within the pipeline's limits, keeps the top of a tall page, and shrinks it to
/// fit `side` (never enlarging) as a JPEG data URI.
fn make_thumbnail(bytes: &[u8], side: u32) -> Result<Thumbnail, PrepareError> {
    let mut image = prepare::decode(bytes, &DecodeLimits::default())?.image;
    let (width, height) = (image.width(), image.height());
    let tallest = (u64::from(width) * u64::from(TALLEST_ASPECT.0) / u64::from(TALLEST_ASPECT.1))
        .clamp(1, u64::from(u32::MAX)) as u32;
    let cropped_from = (height > tallest).then_some((width, height));
    if cropped_from.is_some() {
        image = image.crop_imm(0, 0, width, tallest);
    }
    let rgb = prepare::fit_within(prepare::flatten_to_rgb(image), side);
    let jpeg = prepare::encode_jpeg_with(&rgb, &THUMBNAIL_JPEG)?;
    Ok(Thumbnail {
        data_uri: prepare::data_uri(&jpeg),
        width: rgb.width(),
        height: rgb.height(),
        cropped_from,
    })
}

/// What a placeholder says. Preparation's own words, except that a labelled source in
/// no image format is named as such: the report shows it where an image was expected.
fn placeholder_reason(error: &PrepareError) -> String {
    match error {
        PrepareError::UnsupportedFormat { detail } => {
            format!("not an image the report can show (PNG, JPEG, WebP or GIF): {detail}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    #[test]
    fn a_tall_page_keeps_its_top_and_a_non_image_is_a_reason() -> anyhow::Result<()> {
        let mut png = Vec::new();
        image::DynamicImage::new_rgba8(100, 1000)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)?;
        let thumb = make_thumbnail(&png, 240)?;
        assert_eq!((thumb.width, thumb.height), (100, 125));
        assert_eq!(thumb.cropped_from, Some((100, 1000)));
        assert!(thumb.data_uri.starts_with(prepare::JPEG_DATA_URI_PREFIX));

        let reason = match make_thumbnail(b"hello, not a picture", 240) {
            Ok(_) => anyhow::bail!("text made a thumbnail"),
            Err(e) => placeholder_reason(&e),
        };
        assert!(reason.contains("not an image"), "{reason}");
        Ok(())
    }

    #[test]
    fn a_wide_image_shrinks_to_the_side() -> anyhow::Result<()> {
        let mut png = Vec::new();
        image::DynamicImage::new_rgb8(1280, 800)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)?;
        let thumb = make_thumbnail(&png, 240)?;
        assert_eq!((thumb.width, thumb.height), (240, 150));
        assert_eq!(thumb.cropped_from, None);
        Ok(())
    }
}
