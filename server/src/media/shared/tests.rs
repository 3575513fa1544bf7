use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

const MIB: usize = 1 << 20;

/// The end of the blob of these tests.
const END: u64 = 8 * SPAN;

fn key(n: u8) -> FileKey {
    FileKey {
        media: MediaId::from_slice(&[n; 16]).expect("16 bytes"),
        dev: 1,
        ino: u64::from(n),
        ctime: (0, 0),
    }
}

/// The blob's byte at `i`.
fn byte(i: u64) -> u8 {
    (i % 251) as u8
}

fn bytes_of(r: Range<u64>) -> Bytes {
    r.map(byte).collect::<Vec<u8>>().into()
}

/// Reads from the pattern above, counting its calls and the ranges asked.
#[derive(Default)]
struct Disk {
    calls: AtomicUsize,
    asked: Mutex<Vec<Range<u64>>>,
}

impl Disk {
    async fn read(&self, r: Range<u64>) -> std::io::Result<Bytes> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.asked.lock().unwrap().push(r.clone());
        Ok(bytes_of(r))
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn span(i: u64) -> Range<u64> {
    i * SPAN..(i + 1) * SPAN
}

/// Reads spans `spans` in order, as a download does.
async fn download(r: &Reader, disk: &Disk, spans: Range<u64>) {
    for i in spans {
        let got = r.piece(span(i), span(i), |x| disk.read(x)).await.unwrap();
        assert_eq!(got, bytes_of(span(i)), "span {i}");
        r.reached(span(i).end);
    }
}

impl SharedReads {
    fn spans(&self, file: &FileKey) -> usize {
        self.lock().files.get(file).map_or(0, |f| f.spans.len())
    }

    /// Holders of the span at `start` of `file` (the map's included).
    fn holders(&self, file: &FileKey, start: u64) -> usize {
        self.lock()
            .files
            .get(file)
            .and_then(|f| f.spans.get(&start))
            .map_or(0, |s| Arc::strong_count(&s.cell))
    }
}

#[tokio::test]
async fn a_download_alone_reads_just_its_range_and_keeps_nothing() {
    let reads = SharedReads::new(16 * MIB);
    let disk = Disk::default();
    let a = reads.join(key(1), 100..SPAN);
    let got = a.piece(span(0), 100..SPAN, |x| disk.read(x)).await.unwrap();
    assert_eq!(got, bytes_of(100..SPAN));
    assert_eq!(*disk.asked.lock().unwrap(), vec![100..SPAN]);
    a.reached(SPAN);
    assert_eq!((reads.held(), reads.spans(&key(1))), (0, 0));
    assert_eq!(reads.counts(), Counts { read: 1, shared: 0 });
}

#[tokio::test]
async fn a_download_behind_takes_the_spans_another_one_read() {
    let reads = SharedReads::new(16 * MIB);
    let (disk, never) = (Disk::default(), Disk::default());
    let a = reads.join(key(1), 0..END);
    let b = reads.join(key(1), 0..END);
    download(&a, &disk, 0..4).await;
    assert_eq!(disk.calls(), 4);
    assert_eq!(reads.held(), 4 * MIB, "kept for b, which is behind");
    // A range that starts inside a kept span takes its part of it.
    let c = reads.join(key(1), SPAN + 10..SPAN + 20);
    let got = c
        .piece(span(1), SPAN + 10..SPAN + 20, |x| never.read(x))
        .await
        .unwrap();
    assert_eq!(got, bytes_of(SPAN + 10..SPAN + 20));
    drop(c);
    download(&b, &never, 0..4).await;
    assert_eq!(never.calls(), 0, "b read nothing from disk");
    assert_eq!(reads.held(), 0, "both are past every span");
    assert_eq!(reads.spans(&key(1)), 0);
    assert_eq!(reads.counts(), Counts { read: 4, shared: 5 });
}

#[tokio::test]
async fn a_download_ahead_is_not_kept_for() {
    let reads = SharedReads::new(16 * MIB);
    let disk = Disk::default();
    let a = reads.join(key(1), 0..END);
    let _b = reads.join(key(1), 5 * SPAN..END);
    download(&a, &disk, 0..3).await;
    assert_eq!(*disk.asked.lock().unwrap(), vec![span(0), span(1), span(2)]);
    assert_eq!((reads.held(), reads.spans(&key(1))), (0, 0));
}

#[tokio::test]
async fn a_span_being_read_is_waited_for_and_not_read_again() {
    let reads = SharedReads::new(16 * MIB);
    let a = Arc::new(reads.join(key(1), 0..END));
    let b = Arc::new(reads.join(key(1), 0..END));
    let go = Arc::new(tokio::sync::Notify::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let slow = {
        let (go, calls) = (go.clone(), calls.clone());
        move |r: Range<u64>| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            go.notified().await;
            Ok(bytes_of(r))
        }
    };
    let first = tokio::spawn({
        let (a, slow) = (a.clone(), slow.clone());
        async move { a.piece(span(0), span(0), slow).await }
    });
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let second = tokio::spawn({
        let b = b.clone();
        async move { b.piece(span(0), 0..10, slow).await }
    });
    // The map, a's read and b's wait.
    while reads.holders(&key(1), 0) < 3 {
        tokio::task::yield_now().await;
    }
    go.notify_one();
    assert_eq!(first.await.unwrap().unwrap(), bytes_of(span(0)));
    assert_eq!(second.await.unwrap().unwrap(), bytes_of(0..10));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one read for both");
    assert_eq!(reads.counts(), Counts { read: 1, shared: 1 });
}

#[tokio::test]
async fn spans_past_the_budget_are_read_again_by_the_downloads_behind() {
    let reads = SharedReads::new(2 * MIB);
    let disk = Disk::default();
    let a = reads.join(key(1), 0..END);
    let b = reads.join(key(1), 0..END);
    download(&a, &disk, 0..4).await;
    assert_eq!(reads.held(), 2 * MIB, "no more than the budget");
    download(&b, &disk, 0..4).await;
    assert_eq!(disk.calls(), 6, "b read the two spans not kept");
    assert_eq!(reads.counts(), Counts { read: 6, shared: 2 });
    assert_eq!(reads.held(), 0);
}

#[tokio::test]
async fn the_last_download_to_leave_takes_the_kept_spans_with_it() {
    let reads = SharedReads::new(16 * MIB);
    let disk = Disk::default();
    let a = reads.join(key(1), 0..END);
    let b = reads.join(key(1), 0..END);
    download(&a, &disk, 0..3).await;
    drop(a);
    assert_eq!(reads.held(), 3 * MIB, "kept while b is behind");
    drop(b);
    assert_eq!((reads.held(), reads.files()), (0, 0));
}

#[tokio::test]
async fn a_read_that_fails_or_is_dropped_leaves_the_span_to_the_next() {
    use futures_util::FutureExt as _;
    let reads = SharedReads::new(16 * MIB);
    let disk = Disk::default();
    let a = reads.join(key(1), 0..END);
    let b = reads.join(key(1), 0..END);
    // Dropped while its read is under way.
    let never = |_| std::future::pending::<std::io::Result<Bytes>>();
    assert!(a.piece(span(0), span(0), never).now_or_never().is_none());
    assert_eq!(reads.spans(&key(1)), 0);
    // Failed.
    let fail = |_| async { Err(std::io::Error::other("bad sector")) };
    let e = a.piece(span(0), span(0), fail).await.unwrap_err();
    assert_eq!(e.to_string(), "bad sector");
    assert_eq!(reads.spans(&key(1)), 0);
    download(&b, &disk, 0..1).await;
    assert_eq!(disk.calls(), 1);
    assert_eq!(reads.held(), MIB, "kept for a, still before it");
}

#[tokio::test]
async fn another_file_of_the_same_item_shares_nothing() {
    let reads = SharedReads::new(16 * MIB);
    let disk = Disk::default();
    let a = reads.join(key(1), 0..END);
    let mut replaced = key(1);
    replaced.ino += 1;
    let b = reads.join(replaced, 0..END);
    download(&a, &disk, 0..2).await;
    download(&b, &disk, 0..2).await;
    assert_eq!(disk.calls(), 4);
    assert_eq!(reads.held(), 0);
}

#[tokio::test]
async fn a_small_range_never_has_a_whole_span_read_for_it() {
    let reads = SharedReads::new(16 * MIB);
    let disk = Disk::default();
    // Behind every span, and wanting all of them.
    let _a = reads.join(key(1), 0..END);
    let c = reads.join(key(1), SPAN + 10..SPAN + 20);
    let got = c
        .piece(span(1), SPAN + 10..SPAN + 20, |x| disk.read(x))
        .await
        .unwrap();
    assert_eq!(got, bytes_of(SPAN + 10..SPAN + 20));
    assert_eq!(*disk.asked.lock().unwrap(), vec![SPAN + 10..SPAN + 20]);
    assert_eq!((reads.held(), reads.spans(&key(1))), (0, 0));
}

#[tokio::test]
async fn a_download_is_kept_for_only_where_its_range_goes() {
    let reads = SharedReads::new(16 * MIB);
    let (disk, never) = (Disk::default(), Disk::default());
    let a = reads.join(key(1), 0..END);
    let b = reads.join(key(1), 0..SPAN);
    download(&a, &disk, 0..3).await;
    assert_eq!(reads.held(), MIB, "only the span b's range covers");
    download(&b, &never, 0..1).await;
    assert_eq!(never.calls(), 0);
    assert_eq!(reads.held(), 0);
}
