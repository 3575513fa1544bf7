//! Wire codec: encoding and decoding the messages on the hot paths (a log
//! entry pushed to members, a page of the log, a post), and the frame
//! decoder reassembling a stream of frames.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use huddle_core::frame::{self, Decoder};
use huddle_core::proto::{decode, encode_frame, EntryKind, Event, LogEntry, Request, Response};
use huddle_core::GroupId;

fn entry(seq: u64, size: usize) -> LogEntry {
    LogEntry {
        seq,
        epoch: 7,
        kind: EntryKind::Application,
        timestamp_ms: 1_790_000_000_000,
        data: Bytes::from(vec![0xa5; size]),
    }
}

fn codec(c: &mut Criterion) {
    let group = GroupId([3; 16]);
    let mut g = c.benchmark_group("codec");
    for size in [256usize, 4096, 65536] {
        let event = Event::Entry {
            group,
            entry: entry(42, size),
        };
        let frame = encode_frame(&event);
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("encode_entry_event", size),
            &event,
            |b, e| b.iter(|| encode_frame(black_box(e))),
        );
        let body = frame::split(&frame, frame::DEFAULT_MAX_FRAME)
            .unwrap()
            .0
            .to_vec();
        g.bench_with_input(
            BenchmarkId::new("decode_entry_event", size),
            &body,
            |b, body| b.iter(|| decode::<Event>(black_box(body)).unwrap()),
        );
        let post = Request::Message {
            group,
            message: Bytes::from(vec![0x5a; size]),
        };
        let body = frame::split(&encode_frame(&post), frame::DEFAULT_MAX_FRAME)
            .unwrap()
            .0
            .to_vec();
        g.bench_with_input(
            BenchmarkId::new("decode_message_post", size),
            &body,
            |b, body| b.iter(|| decode::<Request>(black_box(body)).unwrap()),
        );
    }
    // A full page of the log, as a catching-up member reads it.
    let page = Response::Log {
        entries: (1..=256).map(|s| entry(s, 300)).collect(),
        head: 256,
    };
    let frame = encode_frame(&page);
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("encode_log_page_256x300", |b| {
        b.iter(|| encode_frame(black_box(&page)))
    });
    let body = frame::split(&frame, frame::DEFAULT_MAX_FRAME)
        .unwrap()
        .0
        .to_vec();
    g.bench_function("decode_log_page_256x300", |b| {
        b.iter(|| decode::<Response>(black_box(&body)).unwrap())
    });
    g.finish();
}

fn frames(c: &mut Criterion) {
    // 1,000 pushed entries of 300 bytes arriving in 64 KiB reads.
    let mut stream = Vec::new();
    for s in 0..1000 {
        stream.extend_from_slice(&encode_frame(&Event::Entry {
            group: GroupId([1; 16]),
            entry: entry(s, 300),
        }));
    }
    let mut g = c.benchmark_group("frame_decoder");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("reassemble_1000x300_in_64k_reads", |b| {
        b.iter(|| {
            let mut d = Decoder::new(frame::DEFAULT_MAX_FRAME);
            let mut n = 0;
            for chunk in stream.chunks(64 * 1024) {
                d.extend(chunk);
                while let Some(body) = d.next_frame().unwrap() {
                    n += body.len();
                }
            }
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, codec, frames);
criterion_main!(benches);
