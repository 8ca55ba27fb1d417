//! Micro-benchmarks of the delivery path's hot parts, each next to a reference measured in the
//! same run (the machine is noisy, so the ratio is the figure to read):
//!
//! * `queue_pick`: taking the next due domain and 8 of its jobs from a queue index holding
//!   1,000,000 jobs over 10 or 10,000 domains (and putting them back, so the size holds), per
//!   job; reference: a bare `BinaryHeap` pop and push of the same entries.
//! * `queue_drain`: the same pick without putting the jobs back, as delivery does, from an index
//!   filled as an upload fills it (1,000,000 jobs due at once, ids rising); refilled, untimed,
//!   whenever it runs dry. Reference: popping the same entries from a bare `BinaryHeap`.
//! * `spool_write`: an outcome batch of 256 job records through the spool's writer thread
//!   (WAL, not synced); reference: the same batch written straight to a RocksDB with the WAL.
//! * `job_read`: a lane's batch of 8 consecutive job records read back from memory (the spool's
//!   `Reach::Memory` read) out of 100,000 in table files whose blocks are cached; reference: the
//!   same 8 keys read one by one with RocksDB's point reads, restricted to the block cache, from
//!   a bare RocksDB holding the same records the same way.
//! * `smtp_transaction`: one pipelined 10 KB transaction on a kept connection to an in-process
//!   sink that discards; reference: the same bytes written and the replies read by a bare
//!   hand-rolled client over the same kind of socket.
//!
//! Render and DKIM signing are in `benches/message.rs`.
//! `cargo bench --bench delivery`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice::outbound::smtp::client::{ClientSettings, Connection, Envelope, Timeouts, TlsMode};
use sluice::scheduler::index::{DomainId, PendingJob, QueueIndex};
use sluice::store::spool::{Durability, JobId, JobRecord, JobState, Reach, Spool};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const QUEUED: u64 = 1_000_000;
const PICK: usize = 8;

fn domain_ids(q: &mut QueueIndex, domains: u64) -> Vec<DomainId> {
    (0..domains)
        .map(|d| q.domain_id(&format!("d{d}.example")))
        .collect()
}

/// QUEUED jobs spread over `ids` as an upload queues them: due at once, ids rising.
fn fill(q: &mut QueueIndex, ids: &[DomainId]) {
    for i in 0..QUEUED {
        q.push(PendingJob {
            id: JobId::from(i),
            domain: ids[(i % ids.len() as u64) as usize],
            due_ms: 1,
        });
    }
}

fn queue_pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue_pick");
    g.throughput(Throughput::Elements(PICK as u64));
    for domains in [10u64, 10_000] {
        let mut q = QueueIndex::new();
        let ids = domain_ids(&mut q, domains);
        fill(&mut q, &ids);
        g.bench_function(BenchmarkId::new("index", domains), |b| {
            b.iter(|| {
                let (due, _) = q.take_due_domains(10, 1);
                for d in due {
                    let jobs = q.pop_due(d, 10, PICK);
                    for j in jobs {
                        q.push_back(black_box(j));
                    }
                    q.deactivate(d, 0);
                }
            })
        });
    }
    let mut heap: BinaryHeap<Reverse<(u64, u64)>> = (0..QUEUED).map(|i| Reverse((1, i))).collect();
    g.bench_function("reference_binary_heap", |b| {
        b.iter(|| {
            let mut taken = [Reverse((0, 0)); PICK];
            for t in taken.iter_mut() {
                *t = heap.pop().expect("the heap is never empty");
            }
            for t in taken {
                heap.push(black_box(t));
            }
        })
    });
    g.finish();
}

fn queue_drain(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue_drain");
    g.throughput(Throughput::Elements(PICK as u64));
    let domains = 10u64;
    let mut q = QueueIndex::new();
    let ids = domain_ids(&mut q, domains);
    g.bench_function(BenchmarkId::new("index", domains), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                // Refilled only once empty, so every fill is an upload into empty queues, as
                // it is in the end-to-end benchmark.
                if q.is_empty() {
                    fill(&mut q, &ids);
                }
                let started = std::time::Instant::now();
                let (due, _) = q.take_due_domains(10, 1);
                for d in due {
                    // Delivered: released, as the outcome does.
                    let jobs = black_box(q.pop_due(d, 10, PICK));
                    q.release(d, jobs.len() as u64);
                    q.deactivate(d, 0);
                }
                spent += started.elapsed();
            }
            spent
        })
    });
    let mut heap: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
    g.bench_function("reference_binary_heap", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                if heap.len() < PICK {
                    heap.extend((0..QUEUED).map(|i| Reverse((1, i))));
                }
                let started = std::time::Instant::now();
                for _ in 0..PICK {
                    black_box(heap.pop());
                }
                spent += started.elapsed();
            }
            spent
        })
    });
    g.finish();
}

fn record(i: u64) -> Vec<u8> {
    let address = format!("user{i:07}@d{:03}.example", i % 1000);
    JobRecord {
        state: JobState::Delivered,
        upload: 1,
        accepted_at_ms: 1_700_000_000_000,
        attempts: 1,
        next_attempt_ms: 0,
        address: &address,
        vars: r#"{"first_name":"Firstname","last_name":"Lastname","id":"00001234"}"#,
        last_response: "250 2.0.0 Ok: queued as 4Xb2Zk1fQz",
    }
    .encode()
}

/// A runtime with `workers` worker threads.
fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

fn spool_write(c: &mut Criterion) {
    const BATCH: u64 = 256;
    let rt = runtime(1);
    let records: Vec<Vec<u8>> = (0..BATCH).map(record).collect();
    let mut g = c.benchmark_group("spool_write");
    g.throughput(Throughput::Elements(BATCH));
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = rt
        .block_on(async { Spool::open(&dir.path().join("spool")) })
        .expect("spool opens");
    let mut round = 0u64;
    g.bench_function("spool_batch_256", |b| {
        b.iter(|| {
            round += 1;
            let mut batch = spool.batch();
            for (i, r) in records.iter().enumerate() {
                batch.put_job(JobId::from((round % 4096) * BATCH + i as u64), r);
            }
            rt.block_on(spool.write(batch, Durability::Buffered))
                .expect("write");
        })
    });
    rt.block_on(spool.close()).expect("close");
    let raw_dir = tempfile::tempdir().expect("tempdir");
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    let db = rocksdb::DB::open(&opts, raw_dir.path()).expect("rocksdb opens");
    let mut round = 0u64;
    g.bench_function("reference_rocksdb_batch_256", |b| {
        b.iter(|| {
            round += 1;
            let mut batch = rocksdb::WriteBatch::default();
            for (i, r) in records.iter().enumerate() {
                let key = ((round % 4096) * BATCH + i as u64).to_be_bytes();
                batch.put(key, r);
            }
            db.write(batch).expect("write");
        })
    });
    g.finish();
}

fn job_read(c: &mut Criterion) {
    const JOBS: u64 = 100_000;
    const BATCH: usize = 8;
    let rt = runtime(1);
    let ids: Vec<JobId> = (0..JOBS).map(|i| JobId::from((7 << 32) | i)).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("spool");
    rt.block_on(async {
        let spool = Spool::open(&path).expect("spool opens");
        for chunk in ids.chunks(10_000) {
            let mut batch = spool.batch();
            for id in chunk {
                batch.put_job(*id, &record(u64::from(*id)));
            }
            spool
                .write(batch, Durability::Buffered)
                .await
                .expect("write");
        }
        spool.close().await.expect("close");
    });
    // Reopened: the records are in table files; one read from disk puts their blocks in the
    // block cache.
    let spool = Spool::open(&path).expect("spool opens");
    for chunk in ids.chunks(256) {
        spool.get_jobs(chunk, Reach::Disk).expect("read");
    }
    let mut g = c.benchmark_group("job_read");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut at = 0;
    g.bench_function("spool_memory_8", |b| {
        b.iter(|| {
            at = (at + BATCH) % ids.len();
            let got = spool
                .get_jobs(black_box(&ids[at..at + BATCH]), Reach::Memory)
                .expect("in memory");
            assert!(got.iter().all(Option::is_some));
        })
    });
    rt.block_on(spool.close()).expect("close");
    drop(spool);

    let raw_dir = tempfile::tempdir().expect("tempdir");
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    {
        let db = rocksdb::DB::open(&opts, raw_dir.path()).expect("rocksdb opens");
        for chunk in ids.chunks(10_000) {
            let mut batch = rocksdb::WriteBatch::default();
            for id in chunk {
                batch.put(u64::from(*id).to_be_bytes(), record(u64::from(*id)));
            }
            db.write(batch).expect("write");
        }
    }
    let db = rocksdb::DB::open(&opts, raw_dir.path()).expect("rocksdb opens");
    let keys: Vec<[u8; 8]> = ids.iter().map(|id| u64::from(*id).to_be_bytes()).collect();
    for chunk in keys.chunks(256) {
        for r in db.multi_get(chunk) {
            r.expect("read");
        }
    }
    let mut cached = rocksdb::ReadOptions::default();
    cached.set_read_tier(rocksdb::ReadTier::BlockCache);
    let mut at = 0;
    g.bench_function("reference_point_reads_8", |b| {
        b.iter(|| {
            at = (at + BATCH) % keys.len();
            for k in black_box(&keys[at..at + BATCH]) {
                let v = db.get_pinned_opt(k, &cached).expect("in memory");
                assert!(v.map(|v| v.to_vec()).is_some());
            }
        })
    });
    g.finish();
}

/// Accepts connections and answers a pipelined client without looking at the content beyond
/// what it must: 250 to commands, 354 to DATA, 250 after the final dot.
async fn discard_sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let mut io = BufReader::with_capacity(64 * 1024, tcp);
                let _ = io.get_mut().write_all(b"220 sink ESMTP\r\n").await;
                let mut line = Vec::new();
                let mut in_data = false;
                loop {
                    line.clear();
                    match io.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let reply: &[u8] = if in_data {
                        if line != b".\r\n" {
                            continue;
                        }
                        in_data = false;
                        b"250 2.0.0 queued\r\n"
                    } else if line.starts_with(b"EHLO") {
                        b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
                    } else if line.starts_with(b"DATA") {
                        in_data = true;
                        b"354 go on\r\n"
                    } else if line.starts_with(b"QUIT") {
                        let _ = io.get_mut().write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 2.1.0 ok\r\n"
                    };
                    if io.get_mut().write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn message(size: usize) -> Vec<u8> {
    let mut m =
        b"From: news@example.com\r\nTo: someone@example.net\r\nSubject: bench\r\n\r\n".to_vec();
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n";
    while m.len() < size {
        m.extend_from_slice(line);
    }
    m
}

fn smtp_transaction(c: &mut Criterion) {
    let rt = runtime(2);
    let addr = rt.block_on(discard_sink());
    let msg = message(10 * 1024);
    let mut g = c.benchmark_group("smtp_transaction");
    g.throughput(Throughput::Elements(1));
    let timeouts = Timeouts {
        connect: Duration::from_secs(5),
        greeting: Duration::from_secs(5),
        command: Duration::from_secs(5),
        data_init: Duration::from_secs(5),
        data_block: Duration::from_secs(5),
        data_final: Duration::from_secs(5),
    };
    let settings = ClientSettings::new("bench.example".into(), timeouts, &[]);
    let mut conn = rt
        .block_on(Connection::open(
            addr,
            None,
            "sink",
            TlsMode::Disabled,
            &settings,
        ))
        .expect("connects");
    let recipients = ["someone@example.net"];
    let env = Envelope {
        sender: "bounce+token@example.com",
        recipients: &recipients,
        smtputf8: false,
        eight_bit: false,
        dsn: None,
        chunking: false,
    };
    g.bench_function("client_10k", |b| {
        b.iter(|| {
            let replies = rt.block_on(conn.send(&env, &msg)).expect("sends");
            assert_eq!(replies[0].code, 250);
        })
    });
    rt.block_on(conn.quit());
    // The reference: the same commands and bytes, no parsing beyond counting reply lines.
    let mut raw = rt.block_on(async {
        let tcp = TcpStream::connect(addr).await.expect("connects");
        tcp.set_nodelay(true).expect("nodelay");
        let mut io = BufReader::new(tcp);
        let mut line = Vec::new();
        io.read_until(b'\n', &mut line).await.expect("greeting");
        io.get_mut()
            .write_all(b"EHLO bench.example\r\n")
            .await
            .expect("ehlo");
        for _ in 0..3 {
            line.clear();
            io.read_until(b'\n', &mut line).await.expect("ehlo reply");
        }
        io
    });
    let mut data = msg.clone();
    data.extend_from_slice(b".\r\n");
    g.bench_function("reference_bare_10k", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut line = Vec::new();
                raw.get_mut()
                    .write_all(
                        b"MAIL FROM:<bounce+token@example.com>\r\nRCPT TO:<someone@example.net>\r\nDATA\r\n",
                    )
                    .await
                    .expect("commands");
                for _ in 0..3 {
                    line.clear();
                    raw.read_until(b'\n', &mut line).await.expect("reply");
                }
                raw.get_mut().write_all(&data).await.expect("data");
                line.clear();
                raw.read_until(b'\n', &mut line).await.expect("reply");
                assert!(line.starts_with(b"250"));
            })
        })
    });
    let _ = rt.block_on(async {
        let mut rest = Vec::new();
        raw.get_mut().write_all(b"QUIT\r\n").await?;
        raw.read_to_end(&mut rest).await
    });
    g.finish();
}

criterion_group!(
    benches,
    queue_pick,
    queue_drain,
    spool_write,
    job_read,
    smtp_transaction
);
criterion_main!(benches);
