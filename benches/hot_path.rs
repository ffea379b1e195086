//! What the data path adds per request besides routing: metric recording, the in-flight
//! guard, the outcome hand-off to the circuit task, and the snapshot load. The routing decision
//! is measured in the same run as the baseline to compare against.
//!
//! `cargo bench --bench hot_path`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use canaryd::config::Config;
use canaryd::control::Control;
use canaryd::metrics::Metrics;
use canaryd::release::circuit;
use canaryd::release::outcome::{self, Outcome, Routed};
use canaryd::routing::WeightTable;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};

const CONFIG: &str = r#"
[[upstream]]
name = "stable"
url = "http://127.0.0.1:9000"
weight = 90
[[upstream]]
name = "canary"
url = "http://127.0.0.1:9001"
weight = 10
"#;

fn hot_path(c: &mut Criterion) {
    let config = Config::parse(CONFIG).expect("valid config");
    let router = config.router();
    let table = WeightTable::new(vec![9000, 1000], 0).expect("valid table");
    let mut headers = HeaderMap::new();
    headers.insert("x-user-id", HeaderValue::from_static("user-00001234"));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let metrics = Metrics::new();
    let control = rt
        .block_on(async { Control::new(config, metrics.clone()) })
        .expect("plain http upstreams need no TLS files");
    let arm = metrics.arm(&Arc::from("canary"));

    c.bench_function("baseline: routing decision (Router::decide)", |b| {
        b.iter(|| router.decide(&table, black_box(&headers)))
    });
    c.bench_function("metrics: requests_total + duration histogram", |b| {
        b.iter(|| arm.record(black_box(200), black_box(Duration::from_micros(850))))
    });
    c.bench_function("metrics: in-flight guard (inc + dec)", |b| {
        b.iter(|| drop(black_box(arm.start())))
    });
    c.bench_function("snapshot load (ArcSwap::load_full)", |b| {
        b.iter(|| black_box(control.snapshot()))
    });

    // The circuit task drains the channel as it does in the proxy. Only sends that queue
    // their outcome are timed: the sends go in chunks that fit the channel, and between two
    // chunks (untimed) the task takes everything, so no send meets a full channel. Without
    // that the bench would mostly time the cheap `Full` rejection: sends outpace the task's
    // batches by far.
    let (tx, rx) = outcome::channel();
    let ledger = Arc::new(circuit::Ledger::default());
    let _runtime = rt.enter();
    let _task = circuit::spawn(control.clone(), ledger, rx);
    let name: Arc<str> = Arc::from("stable");
    let chunk = (outcome::CHANNEL_CAPACITY / 2) as u64;
    let mut rejected = 0u64;
    c.bench_function("outcome hand-off (try_send to the circuit task)", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(chunk);
                while tx.backlog() > 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
                let start = std::time::Instant::now();
                for _ in 0..n {
                    let o = Outcome {
                        arm: name.clone(),
                        watched: false,
                        error: false,
                        latency: Duration::from_micros(850),
                        at: tokio::time::Instant::now(),
                        routed: Routed::Forced,
                    };
                    if tx.try_send(black_box(o)).is_err() {
                        rejected += 1;
                    }
                }
                timed += start.elapsed();
                left -= n;
            }
            timed
        })
    });
    // Not expected: a rejected send was timed as a cheap failure instead of a hand-off.
    eprintln!("timed sends that met a full channel: {rejected}");
    // Keep the registry alive past the benches that use its handles.
    black_box(metrics.render().len());
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
