//! Image preparation: turn whatever was uploaded into exactly what the model sees.
//!
//! Decode with limits (so no decompression bomb can exhaust memory), apply EXIF
//! orientation, flatten transparency onto white, convert to RGB, downscale to fit the
//! task's longest side (never upscale), encode JPEG, and wrap it in a base64 data URI.
//! Anything that cannot be decoded is an error with a reason a person can read.

use std::io::Cursor;

use base64::Engine;
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

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

/// The same as [`PreparedImage`] with the JPEG itself instead of its data URI, so that
/// a request line can base64-encode it straight into the line
/// ([`crate::request::request_line_with_jpeg`]) without an intermediate string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedJpeg {
    pub jpeg: Vec<u8>,
    pub source_format: &'static str,
    pub source_width: u32,
    pub source_height: u32,
    pub width: u32,
    pub height: u32,
}

/// The prefix of every prepared image's data URI.
pub const JPEG_DATA_URI_PREFIX: &str = "data:image/jpeg;base64,";

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
    let prepared = prepare_jpeg(bytes, settings, limits)?;
    Ok(PreparedImage {
        data_uri: data_uri(&prepared.jpeg),
        source_format: prepared.source_format,
        source_width: prepared.source_width,
        source_height: prepared.source_height,
        width: prepared.width,
        height: prepared.height,
        jpeg_bytes: prepared.jpeg.len(),
    })
}

/// Prepares one image and returns the JPEG bytes (see [`prepare_image`]).
pub fn prepare_jpeg(
    bytes: &[u8],
    settings: &ImageSettings,
    limits: &DecodeLimits,
) -> Result<PreparedJpeg, PrepareError> {
    let decoded = decode(bytes, limits)?;
    let (source_width, source_height) = (decoded.image.width(), decoded.image.height());
    let rgb = flatten_to_rgb(decoded.image);
    let rgb = fit_within(rgb, settings.max_side);
    let jpeg = encode_jpeg(&rgb, settings.jpeg_quality)?;
    Ok(PreparedJpeg {
        jpeg,
        source_format: decoded.format,
        source_width,
        source_height,
        width: rgb.width(),
        height: rgb.height(),
    })
}

/// A decoded, upright image and the format it came in.
#[derive(Debug)]
pub struct Decoded {
    pub image: DynamicImage,
    pub format: &'static str,
}

/// The first stage of preparation (public for the benchmarks): check the limits, decode,
/// and turn the image upright as its EXIF orientation says.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Decoded, PrepareError> {
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
    Ok(Decoded {
        image,
        format: name,
    })
}

/// How a JPEG is encoded. The task's images use [`JpegSettings::sent`]; the benchmarks
/// sweep the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegSettings {
    /// 1–100, libjpeg's scale for the standard quantisation tables.
    pub quality: u8,
    /// Chroma at full resolution (4:4:4) rather than halved both ways (4:2:0).
    pub full_chroma: bool,
    /// Huffman tables optimised for the image (a second pass) rather than the standard ones.
    pub optimize_huffman: bool,
}

impl JpegSettings {
    /// What the model is sent: baseline, full-resolution chroma (4:4:4, so coloured text
    /// keeps its edges), the standard IJG quantisation tables scaled to `quality`, and
    /// the standard Huffman tables. Optimised tables make the JPEG 7% smaller for twice
    /// the encoding time (`shotlabel-bench psnr --sweep`); a line's bytes do not change
    /// its tokens, only how many lines fit in a file, and the submitter is billed by the
    /// second.
    pub fn sent(quality: u8) -> Self {
        Self {
            quality,
            full_chroma: true,
            optimize_huffman: false,
        }
    }
}

/// The JPEG the model is sent (public for the benchmarks), as [`JpegSettings::sent`].
pub fn encode_jpeg(rgb: &RgbImage, quality: u8) -> Result<Vec<u8>, PrepareError> {
    encode_jpeg_with(rgb, &JpegSettings::sent(quality))
}

/// Encodes with libjpeg-turbo's code and SIMD (as built into mozjpeg, with mozjpeg's own
/// slow searches turned off by its "fastest" profile): about 3x faster than the pure-Rust
/// jpeg-encoder on our screenshots, for the same baseline file within a few bytes
/// (`docs/benchmarks.md`).
pub fn encode_jpeg_with(rgb: &RgbImage, settings: &JpegSettings) -> Result<Vec<u8>, PrepareError> {
    const JPEG_MAX_SIDE: u32 = 65_535;
    if rgb.width() > JPEG_MAX_SIDE || rgb.height() > JPEG_MAX_SIDE {
        return Err(PrepareError::Encode(format!(
            "{}x{} is over JPEG's 65,535-pixel side",
            rgb.width(),
            rgb.height()
        )));
    }
    // libjpeg reports errors by unwinding (mozjpeg's error manager panics); none is
    // expected for a well-formed RGB buffer, but one must not take the process down.
    std::panic::catch_unwind(|| -> std::io::Result<Vec<u8>> {
        let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        compress.set_size(rgb.width() as usize, rgb.height() as usize);
        compress.set_fastest_defaults();
        compress.set_quality(f32::from(settings.quality));
        compress.set_optimize_coding(settings.optimize_huffman);
        let chroma_pixels = if settings.full_chroma { (1, 1) } else { (2, 2) };
        compress.set_chroma_sampling_pixel_sizes(chroma_pixels, chroma_pixels);
        let mut started = compress.start_compress(Vec::with_capacity(rgb.as_raw().len() / 8))?;
        started.write_scanlines(rgb.as_raw())?;
        started.finish()
    })
    .map_err(|_| PrepareError::Encode("the JPEG encoder failed".into()))?
    .map_err(|e| PrepareError::Encode(e.to_string()))
}

/// A JPEG as a base64 data URI.
pub fn data_uri(jpeg: &[u8]) -> String {
    let mut uri = String::with_capacity(JPEG_DATA_URI_PREFIX.len() + jpeg.len().div_ceil(3) * 4);
    uri.push_str(JPEG_DATA_URI_PREFIX);
    base64::engine::general_purpose::STANDARD.encode_string(jpeg, &mut uri);
    uri
}

/// RGB with any transparency composited onto white, as a browser shows it on a blank page.
pub fn flatten_to_rgb(image: DynamicImage) -> RgbImage {
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
pub fn fit_within(image: RgbImage, max_side: u32) -> RgbImage {
    let (width, height) = image.dimensions();
    let longest = width.max(height);
    if longest <= max_side {
        return image;
    }
    let scale = f64::from(max_side) / f64::from(longest);
    let new_width = ((f64::from(width) * scale).round() as u32).clamp(1, max_side);
    let new_height = ((f64::from(height) * scale).round() as u32).clamp(1, max_side);
    match resize_simd(&image, new_width, new_height) {
        Some(resized) => resized,
        // Not expected (the sizes are valid by construction), but never worth a failure.
        None => DynamicImage::ImageRgb8(image)
            .resize_exact(new_width, new_height, FilterType::CatmullRom)
            .into_rgb8(),
    }
}

/// CatmullRom convolution, as the image crate's `resize_exact` does it, with
/// fast_image_resize's fixed-point SIMD kernels (AVX2/SSE4.1, chosen at run time): about
/// 20 times faster on a 1280x800 screenshot, and within one level of the f32 result.
fn resize_simd(image: &RgbImage, width: u32, height: u32) -> Option<RgbImage> {
    use fast_image_resize as fr;
    let source = fr::images::ImageRef::new(
        image.width(),
        image.height(),
        image.as_raw(),
        fr::PixelType::U8x3,
    )
    .ok()?;
    let mut resized = fr::images::Image::new(width, height, fr::PixelType::U8x3);
    let options =
        fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom));
    fr::Resizer::new()
        .resize(&source, &mut resized, &options)
        .ok()?;
    RgbImage::from_raw(width, height, resized.into_vec())
}
