//! Content type detection and picture previews.

use std::path::Path;

/// Pictures larger than this are not decoded for a preview.
pub const MAX_SOURCE: u64 = 64 << 20;

/// Previews stay under this size (bytes), so they travel inline in the
/// group message.
pub const MAX_PREVIEW: usize = 8 * 1024;

/// The MIME type of a file, from its first bytes (magic numbers), falling
/// back to text for valid UTF-8 and to `application/octet-stream`.
pub fn mime_of(first_bytes: &[u8], _name: &str) -> String {
    if let Some(t) = infer::get(first_bytes) {
        return t.mime_type().to_owned();
    }
    if !first_bytes.is_empty() && std::str::from_utf8(first_bytes).is_ok() {
        return "text/plain".into();
    }
    "application/octet-stream".into()
}

/// A small JPEG thumbnail of a picture, or `None` if it cannot be decoded.
pub fn thumbnail(path: &Path) -> Option<Vec<u8>> {
    let img = image::ImageReader::open(path)
        .ok()?
        .with_guessed_format()
        .ok()?
        .decode()
        .ok()?;
    for (side, quality) in [(160, 60), (120, 50), (80, 40)] {
        let small = img.thumbnail(side, side).to_rgb8();
        let mut out = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
        if small.write_with_encoder(enc).is_ok() && out.len() <= MAX_PREVIEW {
            return Some(out);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_types_from_content() {
        let png = [
            0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 0x0d,
        ];
        assert_eq!(mime_of(&png, "x.txt"), "image/png");
        assert_eq!(mime_of(b"hello", "x.bin"), "text/plain");
        assert_eq!(
            mime_of(&[0xff, 0xfe, 0x00, 0x81], "x"),
            "application/octet-stream"
        );
    }

    #[test]
    fn thumbnails_are_small() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pic.png");
        let img = image::RgbImage::from_fn(800, 600, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        });
        img.save(&p).unwrap();
        let t = thumbnail(&p).unwrap();
        assert!(t.len() <= MAX_PREVIEW, "{}", t.len());
        assert_eq!(&t[..2], &[0xff, 0xd8], "a JPEG");
        assert!(thumbnail(&dir.path().join("missing.png")).is_none());
    }
}
