//! Image preparation: turn whatever was uploaded into exactly what the model sees.
//!
//! Decode with limits (so no decompression bomb can exhaust memory), apply EXIF
//! orientation, flatten transparency onto white, convert to RGB, downscale to fit the
//! task's longest side (never upscale), encode JPEG, and wrap it in a base64 data URI.
//! Anything that cannot be decoded is an error with a reason a person can read.

use std::io::Cursor;

use base64::Engine;
use image::codecs::jpeg::JpegEncoder;
use image::imageops::FilterType;
use image::{
    DynamicImage, ExtendedColorType, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage,
};

use crate::task::ImageSettings;

/// Bounds on what an input may cost to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// The largest encoded input accepted, in bytes.
    pub max_bytes: u64,
    /// The most pixels (width x height) an image may decode to.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_bytes: 50 * 1024 * 1024,
            // A full-page capture of 1280 x 40,000 fits; a 50,000 x 50,000 bomb does not.
            max_pixels: 64 * 1024 * 1024,
        }
    }
}

/// Why an image could not be prepared. These become failed records, so they say what a
/// person needs to know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    #[error("the file is empty (0 bytes)")]
    Empty,
    #[error("the file is {bytes} bytes, over the {limit}-byte limit")]
    TooLarge { bytes: u64, limit: u64 },
    #[error("not a supported image (PNG, JPEG, WebP or GIF): {detail}")]
    UnsupportedFormat { detail: String },
    #[error("the image is {width}x{height} pixels, over the {limit}-pixel limit")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("the {format} image cannot be decoded: {detail}")]
    Decode {
        format: &'static str,
        detail: String,
    },
    #[error("the prepared image cannot be encoded as JPEG: {0}")]
    Encode(String),
}

/// An image ready to send: a JPEG data URI and what was done to get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedImage {
    pub data_uri: String,
    /// The input's format, e.g. `png`.
    pub source_format: &'static str,
    /// Upright size before downscaling.
    pub source_width: u32,
    pub source_height: u32,
    /// Size sent to the model.
    pub width: u32,
    pub height: u32,
    /// Size of the JPEG before base64.
    pub jpeg_bytes: usize,
}

const SUPPORTED: [ImageFormat; 4] = [
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::WebP,
    ImageFormat::Gif,
];

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "png",
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::WebP => "webp",
        ImageFormat::Gif => "gif",
        _ => "unknown",
    }
}

/// Prepares one image for the model according to the task's image settings.
pub fn prepare_image(
    bytes: &[u8],
    settings: &ImageSettings,
    limits: &DecodeLimits,
) -> Result<PreparedImage, PrepareError> {
    if bytes.is_empty() {
        return Err(PrepareError::Empty);
    }
    let size = bytes.len() as u64;
    if size > limits.max_bytes {
        return Err(PrepareError::TooLarge {
            bytes: size,
            limit: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| PrepareError::UnsupportedFormat {
        detail: "its first bytes match no known image format".into(),
    })?;
    if !SUPPORTED.contains(&format) {
        return Err(PrepareError::UnsupportedFormat {
            detail: format!("it is {format:?}"),
        });
    }
    let name = format_name(format);
    let decode_error = |e: image::ImageError| PrepareError::Decode {
        format: name,
        detail: e.to_string(),
    };

    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decode_limits = Limits::default();
    // Room for the decoded image at 16 bits x 4 channels, plus the decoder's own buffers.
    decode_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(decode_limits);
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(PrepareError::TooManyPixels {
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(PrepareError::Decode {
            format: name,
            detail: "the image has no pixels".into(),
        });
    }
    let orientation = decoder.orientation().map_err(decode_error)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    image.apply_orientation(orientation);
    let (source_width, source_height) = (image.width(), image.height());

    let rgb = flatten_to_rgb(image);
    let rgb = fit_within(rgb, settings.max_side);

    let mut jpeg = Vec::with_capacity(rgb.as_raw().len() / 8);
    // The non-generic entry point: it runs as compiled in the (optimised) image crate.
    JpegEncoder::new_with_quality(&mut jpeg, settings.jpeg_quality)
        .encode(
            rgb.as_raw(),
            rgb.width(),
            rgb.height(),
            ExtendedColorType::Rgb8,
        )
        .map_err(|e| PrepareError::Encode(e.to_string()))?;

    let mut data_uri = String::with_capacity(23 + jpeg.len().div_ceil(3) * 4);
    data_uri.push_str("data:image/jpeg;base64,");
    base64::engine::general_purpose::STANDARD.encode_string(&jpeg, &mut data_uri);
    Ok(PreparedImage {
        data_uri,
        source_format: name,
        source_width,
        source_height,
        width: rgb.width(),
        height: rgb.height(),
        jpeg_bytes: jpeg.len(),
    })
}

/// RGB with any transparency composited onto white, as a browser shows it on a blank page.
fn flatten_to_rgb(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (width, height) = rgba.dimensions();
    let mut rgb = RgbImage::new(width, height);
    for (out, px) in rgb.pixels_mut().zip(rgba.pixels()) {
        let alpha = u32::from(px[3]);
        for c in 0..3 {
            let v = u32::from(px[c]) * alpha + 255 * (255 - alpha);
            out[c] = ((v + 127) / 255) as u8;
        }
    }
    rgb
}

/// Downscales so the longest side is at most `max_side`; smaller images are left alone.
fn fit_within(image: RgbImage, max_side: u32) -> RgbImage {
    let (width, height) = image.dimensions();
    let longest = width.max(height);
    if longest <= max_side {
        return image;
    }
    let scale = f64::from(max_side) / f64::from(longest);
    let new_width = ((f64::from(width) * scale).round() as u32).clamp(1, max_side);
    let new_height = ((f64::from(height) * scale).round() as u32).clamp(1, max_side);
    // DynamicImage's resize is not generic, so it runs as compiled in the image crate,
    // optimised even in debug builds (imageops::resize would be compiled here).
    DynamicImage::ImageRgb8(image)
        .resize_exact(new_width, new_height, FilterType::CatmullRom)
        .into_rgb8()
}
