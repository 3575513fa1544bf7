//! Blob files that skip the page cache.
//!
//! Writing a large blob through the page cache costs the writer several
//! times the CPU of the transfer itself: every buffered write fills fresh
//! cache pages, which the kernel then writes back and reclaims. Large-object
//! stores write big objects with `O_DIRECT` for this reason, and so does
//! Huddle: [`BlobFile`] gathers writes in a 4 KiB-aligned buffer of a few
//! MiB and writes whole blocks straight to the device; the partial block at
//! the end goes through the page cache at each [`BlobFile::sync`], so a
//! durability point can fall at any byte.
//! [`BlobReader`] reads the same way, in aligned spans.
//!
//! Where the file system refuses `O_DIRECT` (at `open`, or with `EINVAL` on
//! the first aligned write), both fall back to ordinary I/O and drop the
//! pages behind them with `posix_fadvise(DONTNEED)`, and say so once in the
//! log. [`Mode::Buffered`] asks for that path outright.

use std::fs::File;
use std::num::NonZeroU64;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Advice, OFlags};

mod pace;
pub use pace::{SyncPace, SYNC_EVERY, SYNC_INTERVAL};

/// The alignment of direct I/O: offsets, lengths and buffer addresses are
/// multiples of it (4 KiB satisfies 512-byte and 4 KiB logical blocks).
pub const ALIGN: usize = 4096;

/// A [`BlobFile`]'s buffer: whole blocks are written when it fills.
pub const WRITE_BUFFER: usize = 4 << 20;

/// How a blob file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `O_DIRECT`, falling back to [`Mode::Buffered`] where refused.
    Direct,
    /// Through the page cache, with the pages dropped behind.
    Buffered,
}

impl Mode {
    /// The mode for this process: [`Mode::Direct`] unless `HUDDLE_BLOB_IO`
    /// is `buffered` (to compare the two paths, or on a file system where
    /// direct I/O is accepted but slow).
    pub fn from_env() -> Self {
        match std::env::var("HUDDLE_BLOB_IO").as_deref() {
            Ok("buffered") => Mode::Buffered,
            _ => Mode::Direct,
        }
    }
}

const EINVAL: i32 = 22;
const ENOSPC: i32 = 28;

static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

fn log_fallback(path: Option<&Path>, why: &std::io::Error) {
    if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            path = %path.map(|p| p.display().to_string()).unwrap_or_default(),
            error = %why,
            "this file system refuses direct I/O; blob files go through the page cache, dropped behind each sync"
        );
    }
}

/// Opens `path` with `opts`, with `O_DIRECT` when `mode` asks for it and the
/// file system takes it.
fn open(opts: &std::fs::OpenOptions, path: &Path, mode: Mode) -> std::io::Result<(File, Mode)> {
    if mode == Mode::Direct {
        let mut direct = opts.clone();
        direct.custom_flags(OFlags::DIRECT.bits() as i32);
        match direct.open(path) {
            Ok(f) => return Ok((f, Mode::Direct)),
            Err(e) if e.raw_os_error() == Some(EINVAL) => log_fallback(Some(path), &e),
            Err(e) => return Err(e),
        }
    }
    Ok((opts.open(path)?, Mode::Buffered))
}

/// Clears `O_DIRECT` on an open file after the file system refused an
/// aligned transfer.
fn to_buffered(file: &File, why: &std::io::Error) -> std::io::Result<()> {
    log_fallback(None, why);
    let flags = rustix::fs::fcntl_getfl(file)?;
    rustix::fs::fcntl_setfl(file, flags - OFlags::DIRECT)?;
    Ok(())
}

/// Drops the cached pages of `[from, to)` (they are clean after a sync, or
/// were only read).
fn drop_pages(file: &File, from: u64, to: u64) {
    if let Some(len) = NonZeroU64::new(to.saturating_sub(from)) {
        let _ = rustix::fs::fadvise(file, from, Some(len), Advice::DontNeed);
    }
}

/// A heap buffer whose usable part starts at an [`ALIGN`] boundary: the
/// allocation is [`ALIGN`] bytes longer and the usable part starts where
/// the address is aligned (a `Vec`'s heap block does not move with it).
#[derive(Debug)]
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    cap: usize,
}

impl Aligned {
    fn new(cap: usize) -> Self {
        let raw = vec![0u8; cap + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        assert!(start < ALIGN, "a byte buffer can always be aligned");
        Self { raw, start, cap }
    }

    fn get(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.cap]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.cap]
    }
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns
/// the bytes read. A direct read that comes back short of a whole block has
/// met the end of the file.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if got % ALIGN != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A blob being written at its end: appends go to an aligned buffer; when
/// it fills, its whole blocks go to a writer thread while a second buffer
/// takes the next appends, so the caller's work (receiving, hashing,
/// decrypting) overlaps with the device's; [`BlobFile::sync`] makes every
/// byte appended so far durable.
#[derive(Debug)]
pub struct BlobFile {
    file: File,
    mode: Mode,
    buf: Aligned,
    /// The other buffer, when no write holds it.
    spare: Option<Aligned>,
    /// Bytes in `buf`; they belong at file offset `base`.
    fill: usize,
    /// Where `buf` starts in the file ([`ALIGN`]ed in direct mode).
    base: u64,
    /// Everything before this offset has been written (not yet synced).
    written: u64,
    /// The end of the write in flight, if one is.
    in_flight: Option<u64>,
    writer: Option<Writer>,
    /// A write failed: what followed it must not reach the file (it would
    /// leave a hole before it), so every later write and sync fails too.
    broken: bool,
    /// Pages before this offset have been dropped from the cache.
    dropped: u64,
    /// Tests: writes from this one on fail.
    fail_from: Option<usize>,
}

/// The thread that writes full buffers, one at a time.
#[derive(Debug)]
struct Writer {
    jobs: std::sync::mpsc::SyncSender<(Aligned, usize, u64)>,
    done: std::sync::mpsc::Receiver<(Aligned, std::io::Result<Mode>)>,
}

impl Writer {
    /// `fail_from`: tests make the writes from this one on fail, as a full
    /// disk would.
    fn start(file: &File, mode: Mode, fail_from: Option<usize>) -> std::io::Result<Self> {
        let file = file.try_clone()?;
        let (jobs, rx) = std::sync::mpsc::sync_channel::<(Aligned, usize, u64)>(1);
        let (tx, done) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("blob-writer".into())
            .spawn(move || {
                let mut mode = mode;
                for (k, (buf, n, at)) in rx.into_iter().enumerate() {
                    let r = if fail_from.is_some_and(|f| k >= f) {
                        Err(std::io::Error::from_raw_os_error(ENOSPC))
                    } else {
                        write_at(&file, &mut mode, &buf.get()[..n], at).map(|()| mode)
                    };
                    if tx.send((buf, r)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self { jobs, done })
    }
}

/// Writes `data` at `at`; where the file system refuses a direct write,
/// clears `O_DIRECT` and writes it through the cache.
fn write_at(file: &File, mode: &mut Mode, data: &[u8], at: u64) -> std::io::Result<()> {
    match file.write_all_at(data, at) {
        Err(e) if *mode == Mode::Direct && e.raw_os_error() == Some(EINVAL) => {
            to_buffered(file, &e)?;
            *mode = Mode::Buffered;
            file.write_all_at(data, at)
        }
        r => r,
    }
}

impl BlobFile {
    /// Opens (creating it if needed) the blob at `path` to go on writing at
    /// `start`: anything past `start` is cut off (it may be torn), and the
    /// partial block before it is read back so the next aligned write
    /// carries it.
    pub fn open_at(path: &Path, start: u64, mode: Mode) -> std::io::Result<Self> {
        Self::open_at_sized(path, start, mode, WRITE_BUFFER)
    }

    /// [`BlobFile::open_at`] with buffers of `buffer` bytes (rounded up to
    /// whole blocks, at least two) instead of [`WRITE_BUFFER`]: a blob
    /// holds two of them while it writes.
    pub fn open_at_sized(
        path: &Path,
        start: u64,
        mode: Mode,
        buffer: usize,
    ) -> std::io::Result<Self> {
        let buffer = buffer.div_ceil(ALIGN).max(2) * ALIGN;
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        let (file, mode) = open(&opts, path, mode)?;
        let have = file.metadata()?.len();
        if have < start {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{} holds {have} bytes, fewer than the {start} to keep",
                    path.display()
                ),
            ));
        }
        file.set_len(start)?;
        let mut this = Self {
            file,
            mode,
            buf: Aligned::new(buffer),
            spare: None,
            fill: 0,
            base: start,
            written: start,
            in_flight: None,
            writer: None,
            broken: false,
            dropped: 0,
            fail_from: None,
        };
        if mode == Mode::Direct {
            this.base = start - start % ALIGN as u64;
            let head = (start - this.base) as usize;
            if head > 0 {
                let got = loop {
                    match read_full_at(&this.file, &mut this.buf.get_mut()[..ALIGN], this.base) {
                        Err(e) if e.raw_os_error() == Some(EINVAL) => {
                            to_buffered(&this.file, &e)?;
                            this.mode = Mode::Buffered;
                        }
                        r => break r?,
                    }
                };
                if got < head {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{} ended while its last block was read", path.display()),
                    ));
                }
                this.fill = head;
            }
            this.written = this.base;
        }
        Ok(this)
    }

    /// The blob's length: everything appended, written or not.
    pub fn len(&self) -> u64 {
        self.base + self.fill as u64
    }

    /// Whether nothing has been appended or kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The I/O path in use (direct unless the file system refused it).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Appends `data`.
    pub fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        while !data.is_empty() {
            if self.fill == self.buf.cap {
                self.write_whole_blocks()?;
            }
            let n = (self.buf.cap - self.fill).min(data.len());
            self.buf.get_mut()[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
        }
        Ok(())
    }

    /// Appends `parts` and returns them as one contiguous slice (to hash
    /// them in one pass). Together they must fit the buffer less one block.
    pub fn write_gather<B: AsRef<[u8]>>(&mut self, parts: &[B]) -> std::io::Result<&[u8]> {
        let from = self.gather(parts)?;
        Ok(&self.buf.get()[from..self.fill])
    }

    /// Copies `parts` to the end of the blob, as one contiguous slice, and
    /// hands that slice to `f`, which may change it in place and returns
    /// how many of its first bytes to keep (the rest is not appended): a
    /// sealed chunk is received straight into the write buffer and opened
    /// there, with no copy of its plaintext. Together the parts must fit
    /// the buffer less one block.
    pub fn write_gather_with<B: AsRef<[u8]>>(
        &mut self,
        parts: &[B],
        f: impl FnOnce(&mut [u8]) -> usize,
    ) -> std::io::Result<()> {
        let from = self.gather(parts)?;
        let kept = f(&mut self.buf.get_mut()[from..self.fill]);
        self.fill = from + kept.min(self.fill - from);
        Ok(())
    }

    /// Copies `parts` into the buffer after what it holds (writing out its
    /// whole blocks first if they do not fit); returns where they start.
    fn gather<B: AsRef<[u8]>>(&mut self, parts: &[B]) -> std::io::Result<usize> {
        self.check()?;
        let total: usize = parts.iter().map(|p| p.as_ref().len()).sum();
        if total > self.buf.cap - ALIGN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{total} bytes at once exceed the blob buffer"),
            ));
        }
        if self.fill + total > self.buf.cap {
            self.write_whole_blocks()?;
        }
        let from = self.fill;
        for p in parts {
            let p = p.as_ref();
            self.buf.get_mut()[self.fill..self.fill + p.len()].copy_from_slice(p);
            self.fill += p.len();
        }
        Ok(from)
    }

    /// Makes every byte appended so far durable; returns the blob's length.
    /// In direct mode the partial last block goes through the page cache
    /// (`O_DIRECT` cleared for that one write, the page dropped after the
    /// sync), so the file never holds bytes past the blob's end, not even
    /// after a crash; the block stays buffered and goes out direct, whole,
    /// once it fills (the kernel keeps the two paths coherent).
    pub fn sync(&mut self) -> std::io::Result<u64> {
        self.write_whole_blocks()?;
        self.wait()?;
        self.check()?;
        if self.fill > 0 {
            // Direct mode only: buffered mode sent everything above. No
            // write is in flight, so the flag change affects this one.
            let flags = rustix::fs::fcntl_getfl(&self.file)?;
            rustix::fs::fcntl_setfl(&self.file, flags - OFlags::DIRECT)?;
            let r = self
                .file
                .write_all_at(&self.buf.get()[..self.fill], self.base);
            rustix::fs::fcntl_setfl(&self.file, flags)?;
            r?;
        }
        self.file.sync_data()?;
        drop_pages(&self.file, self.dropped, self.len());
        self.dropped = self.base;
        Ok(self.len())
    }

    /// Makes what has reached the file durable without writing more (after
    /// a failed write, for example on a full disk); returns how much of
    /// the blob that is.
    pub fn sync_written(&mut self) -> std::io::Result<u64> {
        let _ = self.wait();
        self.file.sync_data()?;
        Ok(self.written)
    }

    /// Syncs everything and hands the file back.
    pub fn finish(mut self) -> std::io::Result<File> {
        self.sync()?;
        self.writer = None;
        Ok(self.file)
    }

    /// Waits for the write in flight; its error, if it failed.
    fn wait(&mut self) -> std::io::Result<()> {
        let Some(end) = self.in_flight.take() else {
            return Ok(());
        };
        let writer = self
            .writer
            .as_ref()
            .expect("a write in flight has a writer");
        let Ok((buf, r)) = writer.done.recv() else {
            self.broken = true;
            return Err(std::io::Error::other("the blob writer thread stopped"));
        };
        self.spare = Some(buf);
        match r {
            Ok(mode) => {
                self.mode = mode;
                self.written = end;
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Fails once a write has failed.
    fn check(&self) -> std::io::Result<()> {
        if self.broken {
            return Err(std::io::Error::other(
                "an earlier write to this blob failed; only what was written before it is kept",
            ));
        }
        Ok(())
    }

    /// Hands the whole blocks of the buffer (everything, in buffered mode)
    /// to the writer thread and goes on in the other buffer, which starts
    /// with the rest.
    fn write_whole_blocks(&mut self) -> std::io::Result<()> {
        let n = match self.mode {
            Mode::Direct => self.fill - self.fill % ALIGN,
            Mode::Buffered => self.fill,
        };
        self.check()?;
        if n == 0 {
            return Ok(());
        }
        self.wait()?;
        if self.writer.is_none() {
            self.writer = Some(Writer::start(&self.file, self.mode, self.fail_from)?);
        }
        let cap = self.buf.cap;
        let mut next = self.spare.take().unwrap_or_else(|| Aligned::new(cap));
        let rest = self.fill - n;
        next.get_mut()[..rest].copy_from_slice(&self.buf.get()[n..self.fill]);
        let full = std::mem::replace(&mut self.buf, next);
        let writer = self.writer.as_ref().expect("started above");
        if writer.jobs.send((full, n, self.base)).is_err() {
            return Err(std::io::Error::other("the blob writer thread stopped"));
        }
        self.in_flight = Some(self.base + n as u64);
        self.fill = rest;
        self.base += n as u64;
        Ok(())
    }
}

/// A stored blob read in aligned spans that bypass the page cache.
#[derive(Debug)]
pub struct BlobReader {
    file: File,
    mode: Mode,
    /// Read buffers the bytes handed out no longer hold.
    spare: std::sync::Arc<crate::BufPool>,
}

/// Most read buffers a [`BlobReader`] keeps for reuse: a fresh zeroed
/// buffer per read cost the DS a `memset` of every byte it sent (7.5 % of
/// its CPU on a download).
const SPARE_MAX: usize = 8;

impl BlobReader {
    /// Opens the blob at `path` for reading.
    pub fn open(path: &Path, mode: Mode) -> std::io::Result<Self> {
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true);
        let (file, mode) = open(&opts, path, mode)?;
        Ok(Self {
            file,
            mode,
            spare: crate::BufPool::new(SPARE_MAX),
        })
    }

    /// A second reader of the same file, sharing this one's spare buffers:
    /// two reads in flight at once, as a download keeps them.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            mode: self.mode,
            spare: self.spare.clone(),
        })
    }

    /// The file's metadata (`fstat`).
    pub fn metadata(&self) -> std::io::Result<std::fs::Metadata> {
        self.file.metadata()
    }

    /// Reads `want` bytes at `offset`, fewer only where the file ends. The
    /// bytes are a slice of one aligned allocation, handed on without a
    /// copy.
    pub fn read_at(&mut self, offset: u64, want: usize) -> std::io::Result<bytes::Bytes> {
        let lo = offset - offset % ALIGN as u64;
        let skip = (offset - lo) as usize;
        let span = (skip + want).div_ceil(ALIGN) * ALIGN;
        let mut buf = self.spare.take(span, ALIGN);
        let got = loop {
            match read_full_at(&self.file, buf.get_mut(), lo) {
                Err(e) if self.mode == Mode::Direct && e.raw_os_error() == Some(EINVAL) => {
                    to_buffered(&self.file, &e)?;
                    self.mode = Mode::Buffered;
                }
                r => break r?,
            }
        };
        if self.mode == Mode::Buffered {
            drop_pages(&self.file, lo, lo + got as u64);
        }
        let end = got.min(skip + want).max(skip);
        Ok(buf.into_bytes(skip..end))
    }
}

#[cfg(test)]
mod tests;
