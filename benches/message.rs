//! Message assembly micro-benchmarks: render + MIME build of a 10 KB personalised message, and
//! DKIM signing of it with ed25519 and RSA-2048 (mail-auth over AWS-LC), next to the bare RSA-2048
//! signature of a fixed input by AWS-LC (the in-process reference for the cost of the RSA
//! operation) and by ring (the backend DKIM used before, kept as a comparison).
//!
//! `cargo bench --bench message`; `scripts/bench-dkim` runs it next to `openssl speed rsa2048`
//! and prints the ratio.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::config::{Config, DkimAlgorithm, DkimEntry};
use sluice::outbound::dkim::DkimKeys;
use sluice::outbound::render::{Assembler, compile};
use sluice::store::campaign::{CampaignKind, CampaignRecord, CampaignState};
use sluice::store::spool::JobId;

fn key(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/dkim")
        .join(name)
}

fn keys(algorithms: &[(DkimAlgorithm, &str)]) -> DkimKeys {
    let entries: Vec<DkimEntry> = algorithms
        .iter()
        .enumerate()
        .map(|(i, (algorithm, file))| DkimEntry {
            domain: "example.com".into(),
            selector: format!("s{i}"),
            algorithm: *algorithm,
            key_file: key(file),
        })
        .collect();
    DkimKeys::load(&entries, "bench").expect("test keys load")
}

/// A campaign whose text and HTML parts come to about 10 KB once rendered.
fn record() -> CampaignRecord {
    let para = "Dear {{ first_name }}, our spring catalogue has {{ count }} new items picked for \
                you in {{ city }}. Prices below are valid until the end of the month.\n";
    let text = para.repeat(38);
    let html = format!(
        "<html><body>{}</body></html>",
        "<p>Dear {{ first_name }}, our <b>spring catalogue</b> has {{ count }} new items for \
         you in {{ city }}.</p>\n"
            .repeat(46)
    );
    CampaignRecord {
        id: uuid::Uuid::now_v7(),
        kind: CampaignKind::Bulk,
        from: "news@example.com".into(),
        from_name: Some("Example News".into()),
        reply_to: None,
        subject: "{{ first_name }}, your spring picks".into(),
        text: Some(text),
        html: Some(html),
        headers: Default::default(),
        tags: vec!["spring".into()],
        attachments: vec![],
        personalised: true,
        state: CampaignState::Active,
        created_at_ms: 1_700_000_000_000,
        lifecycle: Default::default(),
        schedule: Default::default(),
        pool: None,
        stream: None,
        raw: None,
        guard: None,
        breaker: Default::default(),
        tenant: None,
    }
}

const VARS: &str = r#"{"first_name":"Annabelle","count":42,"city":"Lyon"}"#;

fn bench(c: &mut Criterion) {
    let rec = record();
    let compiled = compile(&rec).expect("compiles");
    let config = Config::default();
    let plain = Assembler::new(&config, DkimKeys::default());
    let job = JobId {
        campaign: 1,
        index: 1,
    };
    let message = plain
        .build(
            &rec,
            &compiled,
            job,
            rec.created_at_ms,
            "ann@example.org",
            VARS,
        )
        .expect("renders");
    eprintln!("message size: {} bytes", message.len());

    let mut g = c.benchmark_group("message");
    g.throughput(Throughput::Elements(1));
    g.bench_function("render_mime_10k", |b| {
        b.iter(|| {
            plain
                .build(
                    black_box(&rec),
                    &compiled,
                    job,
                    rec.created_at_ms,
                    "ann@example.org",
                    VARS,
                )
                .expect("renders")
        })
    });
    let rsa = keys(&[(DkimAlgorithm::RsaSha256, "rsa2048.pem")]);
    let ed = keys(&[(DkimAlgorithm::Ed25519Sha256, "ed25519.pem")]);
    let both = keys(&[
        (DkimAlgorithm::RsaSha256, "rsa2048.pem"),
        (DkimAlgorithm::Ed25519Sha256, "ed25519.pem"),
    ]);
    g.bench_function("sign_ed25519_10k", |b| {
        b.iter(|| ed.sign("example.com", black_box(&message)).expect("signs"))
    });
    g.bench_function("sign_rsa2048_10k", |b| {
        b.iter(|| rsa.sign("example.com", black_box(&message)).expect("signs"))
    });
    g.bench_function("sign_rsa2048_ed25519_10k", |b| {
        b.iter(|| {
            both.sign("example.com", black_box(&message))
                .expect("signs")
        })
    });
    // The RSA operation alone, as openssl speed measures it: PKCS#1 v1.5 over a fixed input.
    let pem = std::fs::read(key("rsa2048.pem")).expect("key file");
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(&pem).expect("pkcs8 key");
    let input = b"0123456789abcdef0123456789abcdef";
    let pair =
        aws_lc_rs::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("rsa key");
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut sig = vec![0u8; pair.public_modulus_len()];
    g.bench_function("awslc_rsa2048_raw", |b| {
        b.iter(|| {
            pair.sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &rng,
                black_box(input),
                &mut sig,
            )
            .expect("signs")
        })
    });
    let pair = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("rsa key");
    let rng = ring::rand::SystemRandom::new();
    g.bench_function("ring_rsa2048_raw", |b| {
        b.iter(|| {
            pair.sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &rng,
                black_box(input),
                &mut sig,
            )
            .expect("signs")
        })
    });
    g.finish();
}

use rustls_pki_types::pem::PemObject;

criterion_group!(benches, bench);
criterion_main!(benches);
