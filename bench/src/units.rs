//! Byte sizes on the command line: `1073741824`, `512MiB`, `1GiB`, `64k`.

/// Parses a byte count: digits, optionally followed by a unit: `B`, `KiB`,
/// `MiB`, `GiB`, `TiB` (powers of 1024; `K`, `M`, `G`, `T` and `k` mean the
/// same) or `KB`, `MB`, `GB`, `TB` (powers of 1000). Case does not matter
/// beyond that, spaces between number and unit are allowed.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{s:?} is not a size: expected a number of bytes, like 1048576, 512MiB or 1GiB"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is too large a number"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// [`parse_bytes`] for sizes held in memory.
pub fn parse_bytes_usize(s: &str) -> Result<usize, String> {
    let n = parse_bytes(s)?;
    usize::try_from(n).map_err(|_| format!("{s:?} is too large for this machine"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_and_without_units() {
        assert_eq!(parse_bytes("1073741824"), Ok(1 << 30));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2 gib"), Ok(2 << 30));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("256B"), Ok(256));
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes("1.5GiB").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("1PiB").is_err());
        assert!(parse_bytes("99999999999TiB")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_bytes("-1").is_err());
    }
}
