//! The routing decision: MD5 bucket + weight-table pick, as the data path runs it per request.
//!
//! `cargo bench --bench routing`

use std::hint::black_box;

use canaryd::routing::{bucket, Router, WeightTable};
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};

fn routing(c: &mut Criterion) {
    let table = WeightTable::new(vec![9000, 1000], 0).expect("valid table");
    let three = WeightTable::new(vec![8250, 500, 1250], 0).expect("valid table");
    let router = Router::new(
        HeaderName::from_static("x-user-id"),
        "",
        Some(HeaderName::from_static("x-canary")),
        ["stable", "canary"],
    );
    let keys: Vec<String> = (0..1024).map(|i| format!("user-{i:08}")).collect();

    c.bench_function("bucket (md5 of a 13-byte key)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 1023;
            bucket(b"", black_box(keys[i].as_bytes()))
        })
    });
    c.bench_function("bucket + pick (2 arms)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 1023;
            table.pick(bucket(b"", black_box(keys[i].as_bytes())))
        })
    });
    c.bench_function("bucket + pick (3 arms)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 1023;
            three.pick(bucket(b"", black_box(keys[i].as_bytes())))
        })
    });
    let headers: Vec<HeaderMap> = keys
        .iter()
        .map(|k| {
            let mut h = HeaderMap::new();
            h.insert("x-user-id", HeaderValue::from_str(k).expect("ascii key"));
            h.insert("accept", HeaderValue::from_static("application/json"));
            h.insert("content-type", HeaderValue::from_static("application/json"));
            h
        })
        .collect();
    c.bench_function(
        "Router::decide (override lookup + header + md5 + pick)",
        |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 1023;
                router.decide(&table, black_box(&headers[i]))
            })
        },
    );
}

criterion_group!(benches, routing);
criterion_main!(benches);
