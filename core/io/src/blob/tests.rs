//! Tests of blob files: resumed writes, reads, fallbacks, failures.

use super::*;
use proptest::prelude::*;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Writes `data` in pieces of the given sizes, syncing after the
/// pieces flagged, and checks each sync's durable length and the file
/// as another reader sees it.
fn write_in_pieces(path: &Path, start: u64, data: &[u8], pieces: &[(usize, bool)], mode: Mode) {
    let mut f = BlobFile::open_at(path, start, mode).expect("open");
    assert_eq!(f.len(), start);
    let mut at = start as usize;
    for &(size, sync) in pieces.iter().cycle() {
        if at >= data.len() {
            break;
        }
        let n = size.max(1).min(data.len() - at);
        f.write(&data[at..at + n]).expect("write");
        at += n;
        if sync {
            assert_eq!(f.sync().expect("sync"), at as u64);
            let on_disk = std::fs::read(path).expect("read back");
            assert_eq!(on_disk.len(), at, "the file holds exactly what was synced");
            assert!(on_disk == data[..at], "synced bytes differ");
        }
    }
    f.finish().expect("finish");
    assert!(std::fs::read(path).expect("read back") == data);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Any split of the writes, any durability points, any resume offset:
    /// the file ends up byte-identical, in both modes.
    #[test]
    fn resumed_writes_at_any_offset_give_the_same_bytes(
        len in 0usize..300_000,
        pieces in proptest::collection::vec((1usize..70_000, any::<bool>()), 1..8),
        cut in 0.0f64..1.0,
        buffered in any::<bool>(),
    ) {
        let mode = if buffered { Mode::Buffered } else { Mode::Direct };
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("blob");
        let data = pattern(len, 7);
        let resume = (len as f64 * cut) as usize;
        write_in_pieces(&p, 0, &data[..resume], &pieces, mode);
        // Torn bytes past the durable offset are dropped on reopen.
        std::fs::OpenOptions::new().append(true).open(&p).expect("append")
            .write_all_at(b"torn", resume as u64).expect("torn write");
        write_in_pieces(&p, resume as u64, &data, &pieces, mode);
    }

    #[test]
    fn reads_at_any_offset_return_the_stored_bytes(
        len in 1usize..200_000,
        reads in proptest::collection::vec((0.0f64..1.0, 0usize..90_000), 1..8),
        buffered in any::<bool>(),
    ) {
        let mode = if buffered { Mode::Buffered } else { Mode::Direct };
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("blob");
        let data = pattern(len, 3);
        std::fs::write(&p, &data).expect("write");
        let mut r = BlobReader::open(&p, mode).expect("open");
        for (at, want) in reads {
            let off = (len as f64 * at) as usize;
            let got = r.read_at(off as u64, want).expect("read");
            let end = (off + want).min(len);
            prop_assert!(got[..] == data[off..end]);
        }
        let past = r.read_at(len as u64 + 10, 100).expect("read past the end");
        prop_assert!(past.is_empty());
    }
}

/// Buffers come back for later reads, and what a reused buffer held
/// never shows in a later, shorter read.
#[test]
fn reused_read_buffers_give_only_the_bytes_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("blob");
    let data = pattern(3 * ALIGN + 100, 5);
    std::fs::write(&p, &data).expect("write");
    let mut r = BlobReader::open(&p, Mode::Direct).expect("open");
    let whole = r.read_at(0, data.len()).expect("read");
    assert!(whole[..] == data[..]);
    drop(whole);
    assert_eq!(r.spare.kept(), 1, "the buffer came back");
    let tail = r.read_at(2 * ALIGN as u64 + 7, 10_000).expect("read");
    assert!(tail[..] == data[2 * ALIGN + 7..]);
    assert_eq!(r.spare.kept(), 0, "and was used again");
    let held: Vec<_> = (0..SPARE_MAX + 3)
        .map(|i| r.read_at(i as u64, 10).expect("read"))
        .collect();
    drop(held);
    assert_eq!(r.spare.kept(), SPARE_MAX);
}

#[test]
fn a_cloned_reader_reads_the_same_file_and_shares_the_spare_buffers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("blob");
    let data = pattern(4 * ALIGN + 33, 9);
    std::fs::write(&p, &data).expect("write");
    let mut a = BlobReader::open(&p, Mode::Direct).expect("open");
    let mut b = a.try_clone().expect("clone");
    // Alternate blocks, as a download's two reads in flight take them.
    let first = a.read_at(0, 2 * ALIGN).expect("read");
    let second = b.read_at(2 * ALIGN as u64, 3 * ALIGN).expect("read");
    assert!(first[..] == data[..2 * ALIGN]);
    assert!(second[..] == data[2 * ALIGN..], "short where the file ends");
    drop(first);
    assert_eq!(b.spare.kept(), 1, "a's buffer is b's spare too");
    drop(second);
    assert_eq!(a.spare.kept(), 2);
}

#[test]
fn a_direct_file_keeps_its_mode_on_a_disk_file_system() {
    // On a disk file system that takes O_DIRECT, a silent fallback would
    // hide the path the DS is meant to use.
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("blob");
    let mut f = BlobFile::open_at(&p, 0, Mode::Direct).expect("open");
    f.write(&pattern(3 * ALIGN + 17, 1)).expect("write");
    f.sync().expect("sync");
    let supported = f.mode() == Mode::Direct;
    let fs_type = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir.path())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if matches!(fs_type.as_str(), "ext2/ext3" | "xfs" | "btrfs") {
        assert!(
            supported,
            "{fs_type} takes O_DIRECT, yet the blob fell back"
        );
    }
}

#[test]
fn tmpfs_gives_identical_bytes_whichever_path_it_takes() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm on this machine");
        return;
    }
    let dir = tempfile::tempdir_in(shm).expect("tempdir");
    for mode in [Mode::Direct, Mode::Buffered] {
        let p = dir.path().join(format!("{mode:?}"));
        let data = pattern(WRITE_BUFFER + 3 * ALIGN + 5, 9);
        write_in_pieces(&p, 0, &data[..ALIGN + 3], &[(1000, true)], mode);
        write_in_pieces(
            &p,
            ALIGN as u64 + 3,
            &data,
            &[(65_537, false), (1, true)],
            mode,
        );
        let mut r = BlobReader::open(&p, mode).expect("open");
        assert!(r.read_at(5, data.len()).expect("read")[..] == data[5..]);
    }
}

#[test]
fn small_buffers_give_the_same_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("blob");
    let data = pattern(5 * ALIGN + 77, 4);
    let mut f = BlobFile::open_at_sized(&p, 0, Mode::Direct, 1).expect("open");
    for piece in data.chunks(3000) {
        f.write(piece).expect("write");
    }
    assert!(
        f.write_gather(&[vec![0u8; 2 * ALIGN]]).is_err(),
        "larger than a buffer less a block"
    );
    f.finish().expect("finish");
    assert!(std::fs::read(&p).expect("read") == data);
}

/// A failed write is final: a later sync must not write what followed
/// it (the file would hold a hole and claim the bytes after it), and
/// what was written before it is what counts.
#[test]
fn after_a_failed_write_only_what_came_before_it_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("blob");
    let data = pattern(4 * 2 * ALIGN + 100, 6);
    let mut f = BlobFile::open_at_sized(&p, 0, Mode::Direct, 2 * ALIGN).expect("open");
    f.fail_from = Some(1);
    let mut failed = false;
    for piece in data.chunks(1000) {
        if f.write(piece).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "the second buffer's write fails and says so");
    assert!(
        f.sync().is_err(),
        "nothing after the failed write is synced"
    );
    assert!(f.write(b"more").is_err());
    assert_eq!(
        f.sync_written().expect("sync what was written"),
        2 * ALIGN as u64
    );
    let on_disk = std::fs::read(&p).expect("read");
    assert!(on_disk == data[..2 * ALIGN]);
}

#[test]
fn a_shorter_file_than_the_offset_to_keep_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("blob");
    std::fs::write(&p, [1u8; 100]).expect("write");
    let e = BlobFile::open_at(&p, 4096 + 100, Mode::Direct).expect_err("too short");
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
}

/// What the closure keeps is appended, and nothing past it: the next
/// append follows the kept bytes, in any buffer position.
#[test]
fn a_gathered_write_keeps_what_its_closure_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("blob");
    let mut f = BlobFile::open_at_sized(&p, 0, Mode::Direct, 3 * ALIGN).expect("open");
    let mut want = Vec::new();
    for round in 0..40u8 {
        let parts = [
            pattern(1000 + 37 * usize::from(round), round),
            pattern(16, 99),
        ];
        let keep = parts[0].len();
        f.write_gather_with(&parts, |b| {
            assert_eq!(b.len(), keep + 16);
            assert!(b[..keep] == parts[0][..] && b[keep..] == parts[1][..]);
            b[..keep].iter_mut().for_each(|x| *x ^= 0x5a);
            keep
        })
        .expect("gather");
        want.extend(parts[0].iter().map(|x| x ^ 0x5a));
        if round % 7 == 0 {
            assert_eq!(f.sync().expect("sync"), want.len() as u64);
        }
    }
    f.write_gather_with(&[[1u8; 10]], |_| 0).expect("keep none");
    f.finish().expect("finish");
    assert!(std::fs::read(&p).expect("read") == want);
}

#[test]
fn gathered_parts_come_back_contiguous() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("blob");
    let mut f = BlobFile::open_at(&p, 0, Mode::Direct).expect("open");
    let mut all = Vec::new();
    for round in 0..12u8 {
        let parts = [pattern(300_001, round), pattern(77, round + 1)];
        let seen = f.write_gather(&parts).expect("gather").to_vec();
        assert_eq!(seen, [parts[0].clone(), parts[1].clone()].concat());
        all.extend_from_slice(&seen);
    }
    let too_big = [vec![0u8; WRITE_BUFFER]];
    assert!(f.write_gather(&too_big).is_err());
    f.finish().expect("finish");
    assert!(std::fs::read(&p).expect("read") == all);
}
