//! Image preparation on the real screenshots and on every awkward input.

use std::path::{Path, PathBuf};

use base64::Engine;
use image::GenericImageView;
use shotlabel_core::prepare::{DecodeLimits, PrepareError, PreparedImage, prepare_image};
use shotlabel_core::task::{ImageSettings, Task};

fn data(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data")
        .join(path)
}

fn settings() -> anyhow::Result<ImageSettings> {
    Ok(Task::default_task()?.image().clone())
}

fn prepare(path: &str) -> anyhow::Result<Result<PreparedImage, PrepareError>> {
    let bytes = std::fs::read(data(path))?;
    Ok(prepare_image(
        &bytes,
        &settings()?,
        &DecodeLimits::default(),
    ))
}

/// Decodes the JPEG inside a prepared data URI.
fn decode(prepared: &PreparedImage) -> anyhow::Result<image::DynamicImage> {
    let b64 = prepared
        .data_uri
        .strip_prefix("data:image/jpeg;base64,")
        .ok_or_else(|| anyhow::anyhow!("not a JPEG data URI"))?;
    let jpeg = base64::engine::general_purpose::STANDARD.decode(b64)?;
    assert_eq!(jpeg.len(), prepared.jpeg_bytes);
    assert_eq!(image::guess_format(&jpeg)?, image::ImageFormat::Jpeg);
    Ok(image::load_from_memory(&jpeg)?)
}

/// The mean absolute difference per channel of two same-sized images (0-255).
fn mean_abs_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let total: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| f64::from(x.abs_diff(*y)))
        .sum();
    total / a.as_raw().len() as f64
}

#[test]
fn screenshots_are_downscaled_to_896_and_sent_as_jpeg() -> anyhow::Result<()> {
    for entry in std::fs::read_dir(data("screenshots"))? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "png") {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let prepared = prepare_image(&bytes, &settings()?, &DecodeLimits::default())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        assert_eq!(prepared.source_format, "png");
        assert_eq!(
            prepared.width.max(prepared.height),
            896,
            "{}",
            path.display()
        );
        // Aspect ratio kept to within rounding.
        let source_ratio = f64::from(prepared.source_width) / f64::from(prepared.source_height);
        let ratio = f64::from(prepared.width) / f64::from(prepared.height);
        assert!(
            (source_ratio - ratio).abs() / source_ratio < 0.02,
            "{}",
            path.display()
        );
        let decoded = decode(&prepared)?;
        assert_eq!(decoded.dimensions(), (prepared.width, prepared.height));
    }
    Ok(())
}

#[test]
fn rotated_exif_jpeg_is_turned_upright() -> anyhow::Result<()> {
    let prepared = prepare("awkward/rotated-exif.jpg")??;
    // Stored 800 wide x 1280 high, with orientation 6: upright it is 1280 x 800.
    assert_eq!((prepared.source_width, prepared.source_height), (1280, 800));
    assert_eq!((prepared.width, prepared.height), (896, 560));

    // And the pixels match the upright original, not a rotated copy.
    let original = image::open(data("screenshots/geocities-home.png"))?
        .resize_exact(896, 560, image::imageops::FilterType::Triangle)
        .to_rgb8();
    let ours = decode(&prepared)?.to_rgb8();
    let mean_abs_diff = mean_abs_diff(&ours, &original);
    assert!(mean_abs_diff < 20.0, "mean abs diff {mean_abs_diff}");
    Ok(())
}

#[test]
fn transparency_is_flattened_onto_white() -> anyhow::Result<()> {
    let prepared = prepare("awkward/transparent.png")??;
    let decoded = decode(&prepared)?.to_rgb8();
    // The corners are fully transparent in the source: white once flattened.
    for (x, y) in [(0, 0), (decoded.width() - 1, 0), (0, decoded.height() - 1)] {
        let px = decoded.get_pixel(x, y);
        assert!(px.0.iter().all(|&c| c > 235), "corner ({x},{y}) is {px:?}");
    }
    Ok(())
}

#[test]
fn other_formats_and_colour_models_are_prepared() -> anyhow::Result<()> {
    for (file, format) in [
        ("awkward/screenshot.jpg", "jpeg"),
        ("awkward/screenshot.webp", "webp"),
        ("awkward/cmyk.jpg", "jpeg"),
        ("awkward/gray16.png", "png"),
        ("awkward/interlaced.png", "png"),
        ("awkward/animated.gif", "gif"),
    ] {
        let prepared = prepare(file)?.map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        assert_eq!(prepared.source_format, format, "{file}");
        assert!(prepared.width.max(prepared.height) <= 896, "{file}");
        let decoded = decode(&prepared)?;
        assert_eq!(decoded.dimensions(), (prepared.width, prepared.height));
    }
    Ok(())
}

#[test]
fn cmyk_colours_survive() -> anyhow::Result<()> {
    // The CMYK JPEG was made from shop-product-grid.png: the prepared image must look like
    // it, not like an inverted or channel-swapped copy.
    let prepared = prepare("awkward/cmyk.jpg")??;
    let ours = decode(&prepared)?.to_rgb8();
    let reference = image::open(data("screenshots/shop-product-grid.png"))?
        .resize_exact(
            ours.width(),
            ours.height(),
            image::imageops::FilterType::Triangle,
        )
        .to_rgb8();
    let mean_abs_diff = mean_abs_diff(&ours, &reference);
    assert!(mean_abs_diff < 25.0, "mean abs diff {mean_abs_diff}");
    Ok(())
}

#[test]
fn tiny_images_are_never_upscaled() -> anyhow::Result<()> {
    let prepared = prepare("awkward/pixel.png")??;
    assert_eq!((prepared.width, prepared.height), (1, 1));
    Ok(())
}

#[test]
fn broken_inputs_give_clear_reasons() -> anyhow::Result<()> {
    assert_eq!(prepare("awkward/empty.png")?, Err(PrepareError::Empty));

    let err = prepare("awkward/not-an-image.png")?.expect_err("text");
    assert!(
        matches!(err, PrepareError::UnsupportedFormat { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("not a supported image"), "{err}");

    let err = prepare("awkward/truncated.png")?.expect_err("truncated");
    assert!(
        matches!(err, PrepareError::Decode { format: "png", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("cannot be decoded"), "{err}");
    Ok(())
}

#[test]
fn every_awkward_file_is_prepared_or_refused_without_panicking() -> anyhow::Result<()> {
    let mut seen = 0;
    for entry in std::fs::read_dir(data("awkward"))? {
        let path = entry?.path();
        let bytes = std::fs::read(&path)?;
        match prepare_image(&bytes, &settings()?, &DecodeLimits::default()) {
            Ok(prepared) => assert!(prepared.data_uri.starts_with("data:image/jpeg;base64,")),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        seen += 1;
    }
    assert_eq!(seen, 12);
    Ok(())
}

#[test]
fn limits_stop_oversized_inputs_before_decoding() -> anyhow::Result<()> {
    let bytes = std::fs::read(data("screenshots/saas-landing.png"))?;
    let small = DecodeLimits {
        max_bytes: 1000,
        ..DecodeLimits::default()
    };
    let err = prepare_image(&bytes, &settings()?, &small).expect_err("too many bytes");
    assert!(
        matches!(err, PrepareError::TooLarge { limit: 1000, .. }),
        "{err:?}"
    );

    let few_pixels = DecodeLimits {
        max_pixels: 1000,
        ..DecodeLimits::default()
    };
    let err = prepare_image(&bytes, &settings()?, &few_pixels).expect_err("too many pixels");
    assert!(matches!(err, PrepareError::TooManyPixels { .. }), "{err:?}");
    Ok(())
}

#[test]
fn a_decompression_bomb_is_refused_cheaply() -> anyhow::Result<()> {
    // A valid PNG header claiming 100,000 x 100,000 pixels: refused from the header alone.
    let mut png = Vec::new();
    png.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&(ihdr.len() as u32).to_be_bytes());
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&ihdr);
    png.extend_from_slice(&chunk);
    png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    let err = prepare_image(&png, &settings()?, &DecodeLimits::default()).expect_err("bomb");
    assert!(
        matches!(
            err,
            PrepareError::TooManyPixels {
                width: 100_000,
                height: 100_000,
                ..
            }
        ) || matches!(err, PrepareError::Decode { .. }),
        "{err:?}"
    );
    Ok(())
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn quality_and_size_follow_the_task() -> anyhow::Result<()> {
    let bytes = std::fs::read(data("screenshots/saas-landing.png"))?;
    let small = ImageSettings {
        max_side: 448,
        jpeg_quality: 85,
    };
    let low = ImageSettings {
        max_side: 896,
        jpeg_quality: 40,
    };
    let default = prepare_image(&bytes, &settings()?, &DecodeLimits::default())?;
    let smaller = prepare_image(&bytes, &small, &DecodeLimits::default())?;
    let lower = prepare_image(&bytes, &low, &DecodeLimits::default())?;
    assert_eq!(smaller.width.max(smaller.height), 448);
    assert!(smaller.jpeg_bytes < default.jpeg_bytes);
    assert!(lower.jpeg_bytes < default.jpeg_bytes);
    Ok(())
}

/// The frame header of a JPEG: its SOF marker and each component's sampling byte.
fn frame_header(jpeg: &[u8]) -> anyhow::Result<(u8, Vec<u8>)> {
    anyhow::ensure!(jpeg.starts_with(&[0xFF, 0xD8]), "no SOI marker");
    let mut at = 2;
    while at + 4 <= jpeg.len() {
        anyhow::ensure!(jpeg[at] == 0xFF, "no marker at byte {at}");
        let marker = jpeg[at + 1];
        let length = usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
        let segment = jpeg
            .get(at + 4..at + 2 + length)
            .ok_or_else(|| anyhow::anyhow!("a segment runs past the end"))?;
        if (0xC0..=0xC2).contains(&marker) {
            let components = usize::from(segment[5]);
            let sampling = (0..components).map(|i| segment[6 + 3 * i + 1]).collect();
            return Ok((marker, sampling));
        }
        anyhow::ensure!(marker != 0xDA, "scan data before any frame header");
        at += 2 + length;
    }
    anyhow::bail!("no frame header")
}

#[test]
fn the_jpeg_is_baseline_full_chroma_and_faithful() -> anyhow::Result<()> {
    use shotlabel_core::prepare::{JpegSettings, encode_jpeg, encode_jpeg_with, fit_within};

    let source = image::open(data("screenshots/saas-landing.png"))?.into_rgb8();
    let resized = fit_within(source, 896);
    let sent = encode_jpeg(&resized, 85)?;
    // Baseline (SOF0), three components, none subsampled (4:4:4).
    assert_eq!(frame_header(&sent)?, (0xC0, vec![0x11, 0x11, 0x11]));
    let decoded = image::load_from_memory(&sent)?.into_rgb8();
    assert!(mean_abs_diff(&decoded, &resized) < 2.0);

    let half_chroma = encode_jpeg_with(
        &resized,
        &JpegSettings {
            full_chroma: false,
            ..JpegSettings::sent(85)
        },
    )?;
    assert_eq!(frame_header(&half_chroma)?, (0xC0, vec![0x22, 0x11, 0x11]));
    assert!(half_chroma.len() < sent.len());

    let optimized = encode_jpeg_with(
        &resized,
        &JpegSettings {
            optimize_huffman: true,
            ..JpegSettings::sent(85)
        },
    )?;
    assert!(optimized.len() < sent.len());
    // Same coefficients, other code words: the same pixels.
    let decoded_optimized = image::load_from_memory(&optimized)?.into_rgb8();
    assert_eq!(decoded_optimized, decoded);
    Ok(())
}
