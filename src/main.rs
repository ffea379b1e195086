//! The `canaryd` command line: parses arguments, sets up logging, maps outcomes to exit codes.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use canaryd::config::Config;
use canaryd::routing::{fmt_percent, WeightTable};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};

/// mimalloc instead of the system allocator: with glibc's malloc, allocation and free were
/// about 8% of canaryd's CPU time on the HTTP/2 path (perf), and every request allocates
/// (hyper's per-stream task and state, header maps, buffers). Its transparent huge pages are
/// off unless `--huge-pages` (see [`huge_pages`]).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs [`lazy_arena_commit`] as the process starts: a constructor of priority 99 runs before
/// mimalloc's own (priority 101 when built with clang, none with gcc) and before Rust's
/// runtime allocates anything, which is when mimalloc reserves its first arena and reads how
/// to commit it.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array.00099"]
static LAZY_ARENA_COMMIT: extern "C" fn() = lazy_arena_commit;

/// Tells mimalloc to commit its arenas as they are used rather than all at once when it
/// reserves them (its default on Linux): measured under `wrk -c64`, canaryd then holds about
/// 3.5 MiB less resident memory, idle and under load, at the same speed. Setting the option in
/// `main` would be too late: the first arena is reserved by then.
#[cfg(target_os = "linux")]
extern "C" fn lazy_arena_commit() {
    // SAFETY: sets one integer option; mimalloc reads it when it first reserves an arena.
    unsafe { mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) }
}

/// `mi_option_arena_eager_commit` in mimalloc's `mi_option_t` (the same in v2 and v3).
#[cfg(target_os = "linux")]
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

// mimalloc's option calls (the library is linked in by the `mimalloc` crate).
#[cfg(target_os = "linux")]
extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    #[cfg(test)]
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
}

/// Exit code for an invalid config or command line.
const EXIT_INVALID: u8 = 2;
/// Exit code for a runtime failure.
const EXIT_RUNTIME: u8 = 1;

#[derive(Parser)]
#[command(
    name = "canaryd",
    version,
    about = "Sticky canary traffic splitting reverse proxy"
)]
struct Cli {
    /// Worker threads (default: the CPUs available, or $TOKIO_WORKER_THREADS). With 1, canaryd
    /// runs on a single-threaded runtime, which saves cross-thread synchronisation per request.
    #[arg(long, global = true, env = "CANARYD_THREADS")]
    threads: Option<usize>,
    /// Let the allocator back the heap with transparent huge pages (Linux): faster (fewer TLB
    /// misses; about 5-10% more HTTP/2 throughput measured) for about 8 MiB more resident
    /// memory at idle and under load. Off by default: a sidecar's memory comes first.
    #[arg(long, global = true, env = "CANARYD_HUGE_PAGES")]
    huge_pages: bool,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve traffic with the given config.
    Run {
        /// Config file (TOML).
        #[arg(long, env = "CANARYD_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config and print the effective weight table.
    Check {
        /// Config file (TOML).
        #[arg(long, env = "CANARYD_CONFIG")]
        config: PathBuf,
    },
    /// Print the bucket and arm for one user id.
    Route {
        /// Config file (TOML).
        #[arg(long, env = "CANARYD_CONFIG")]
        config: PathBuf,
        /// The sticky key (user id).
        #[arg(long)]
        key: String,
        /// Another table (`canary=25[,other=5]`, percent; the baseline gets the rest, unnamed
        /// arms keep the config's weight): also print the arm under it, and whether the user
        /// moves.
        #[arg(long)]
        weights: Option<String>,
    },
    /// Estimate, before a release, how often the config rolls back a good canary and how fast
    /// it catches a bad one: the analysis run on simulated outcomes (no sockets).
    Simulate(SimulateArgs),
    /// Run the proxy in front of two built-in model servers.
    Demo {
        /// Share of canary requests that fail (0..1), to watch the rollback circuit.
        #[arg(long, default_value_t = 0.0)]
        canary_error_rate: f64,
        /// Proxy address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin API address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// Run a compressed progressive rollout (seconds per step) with generated traffic,
        /// print a line per step, and stop when it ends (promoted or rolled back).
        #[arg(long)]
        rollout: bool,
        /// Copy every request to a third model that disagrees on 25% of inputs (GET /shadow).
        #[arg(long)]
        shadow: bool,
        /// Share of the canary's answers whose label flips (0..1), to watch drift in /status.
        #[arg(long, default_value_t = 0.0)]
        canary_drift: f64,
    },
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// Config file (TOML); its `[rollback]` section is what is simulated.
    #[arg(long, env = "CANARYD_CONFIG")]
    config: PathBuf,
    /// Requests per second through the proxy (turns requests into seconds).
    #[arg(long, default_value_t = 100.0)]
    rps: f64,
    /// The canary's weight in percent; several (`10,50`) split each run into equal parts, like
    /// ramp steps. Default: the first canary's weight in the config.
    #[arg(long, value_delimiter = ',')]
    weight: Vec<f64>,
    /// The baseline's error rate (0..1).
    #[arg(long, default_value_t = 0.0)]
    baseline_error: f64,
    /// The regressed canary's error rate (0..1). Default: the baseline's.
    #[arg(long)]
    canary_error: Option<f64>,
    /// The baseline's median latency in ms (log-normal).
    #[arg(long, default_value_t = 20.0)]
    latency_ms: f64,
    /// The regressed canary's median latency in ms. Default: the baseline's.
    #[arg(long)]
    canary_latency_ms: Option<f64>,
    /// Spread of the log-normal latencies (standard deviation of the log).
    #[arg(long, default_value_t = 0.5)]
    latency_sigma: f64,
    /// Runs per scenario.
    #[arg(long, default_value_t = 1000)]
    runs: u64,
    /// Length of one run, at `--rps`.
    #[arg(long, default_value = "10m")]
    duration: String,
    /// Seed: the same seed gives the same result on any machine.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    huge_pages(cli.huge_pages);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Route {
            config,
            key,
            weights,
        } => route(&config, &key, weights.as_deref()),
        Command::Run { config } => run(config, cli.threads),
        Command::Simulate(args) => simulate(&args, cli.threads),
        Command::Demo {
            canary_error_rate,
            listen,
            admin,
            rollout,
            shadow,
            canary_drift,
        } => demo(
            canaryd::demo::DemoOptions {
                canary_error_rate,
                listen,
                admin,
                rollout,
                shadow,
                canary_drift,
            },
            cli.threads,
        ),
    }
}

/// Allows or forbids transparent huge pages for the process (`PR_SET_THP_DISABLE`, which a
/// parent's setting would otherwise decide): mimalloc asks for them on its heap, which costs
/// about 8 MiB of resident memory at idle and under load.
#[cfg(target_os = "linux")]
fn huge_pages(allow: bool) {
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(!allow) {
        tracing::debug!(error = %e, "could not set the transparent huge pages flag");
    }
}

#[cfg(not(target_os = "linux"))]
fn huge_pages(_allow: bool) {}

/// The log filter: `RUST_LOG` (default `info`), with rustls held to errors unless `RUST_LOG`
/// names it. rustls warns once per handshake about things a client chose, such as an IP
/// address sent as the server name (wrk and OpenSSL clients do): at `warn`, any client could
/// write a log line per connection.
fn log_filter(env: Option<&str>) -> String {
    let base = env
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("info");
    if base.contains("rustls") {
        base.to_owned()
    } else {
        format!("{base},rustls=error")
    }
}

fn init_logging(format: LogFormat) {
    let env = std::env::var("RUST_LOG").ok();
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(env.as_deref()))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter(None)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!(
            "{}: invalid config ({} problems):",
            path.display(),
            errors.0.len()
        );
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        ExitCode::from(EXIT_INVALID)
    })
}

fn check(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let tls_errors = canaryd::tls::check_files(&config);
    if !tls_errors.is_empty() {
        eprintln!(
            "{}: invalid config ({} problems):",
            path.display(),
            tls_errors.len()
        );
        for e in &tls_errors {
            eprintln!("  {e}");
        }
        return ExitCode::from(EXIT_INVALID);
    }
    let table = config.weight_table();
    println!("{}: OK", path.display());
    println!("{:<16} {:>8}  {:<14} url", "upstream", "weight", "buckets");
    for (i, u) in config.upstreams.iter().enumerate() {
        let (start, end) = table.range(i);
        let role = if i == config.baseline {
            "  (baseline)"
        } else {
            ""
        };
        println!(
            "{:<16} {:>7}%  {:<14} {}{role}",
            u.name,
            fmt_percent(u.weight_bp),
            format!("[{start}, {end})"),
            u.url_text(),
        );
    }
    if let Some(tls) = &config.listen.tls {
        println!(
            "TLS: {} / {} (ALPN h2, http/1.1)",
            tls.cert.display(),
            tls.key.display()
        );
    }
    ExitCode::SUCCESS
}

fn route(path: &Path, key: &str, weights: Option<&str>) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let table = config.weight_table();
    let proposed = match weights.map(|w| proposed_table(&config, w)).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("--weights: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    if http::HeaderValue::from_str(key).is_err() {
        eprintln!("--key {key:?} cannot be sent as an HTTP header value");
        return ExitCode::from(EXIT_INVALID);
    }
    let router = config.router();
    let name = |i: usize| config.upstreams[i].name.as_str();
    println!("key:    {key}");
    if let Some(arm) = router.pinned(key.as_bytes()) {
        println!("arm:    {}", name(arm));
        println!(
            "why:    [routing.pins] pins this user to {}, whatever the weights",
            name(arm)
        );
        if proposed.is_some() {
            println!("moves:  no (pinned)");
        }
        return ExitCode::SUCCESS;
    }
    let bucket = router.bucket(key.as_bytes());
    let arm = table.pick(bucket);
    let (start, end) = table.range(arm);
    println!("bucket: {bucket}");
    println!("arm:    {}", name(arm));
    println!(
        "why:    md5(salt ++ key) gives bucket {bucket}; {} serves buckets [{start}, {end})",
        name(arm)
    );
    if let Some(to) = proposed {
        let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        let other = to.pick(bucket);
        let (start, end) = to.range(other);
        println!(
            "under:  {} ({} serves buckets [{start}, {end}))",
            canaryd::control::describe(&names, to.weights()),
            name(other)
        );
        if other == arm {
            println!("moves:  no, stays on {}", name(arm));
        } else {
            println!("moves:  yes, {} -> {}", name(arm), name(other));
        }
    }
    ExitCode::SUCCESS
}

/// The config's table with `spec` (`canary=25,other=5`) applied as `PUT /weights` would.
fn proposed_table(config: &Config, spec: &str) -> Result<WeightTable, String> {
    let mut requested = std::collections::BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, value)) = part.split_once('=') else {
            return Err(format!("{part:?} is not NAME=PERCENT (e.g. canary=25)"));
        };
        let bp = value
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|p| (0.0..=100.0).contains(p) && ((p * 100.0).round() - p * 100.0).abs() < 1e-6)
            .map(|p| (p * 100.0).round() as u16)
            .ok_or_else(|| {
                format!("weight of {name:?} must be a number from 0 to 100 with at most 2 decimals, got {value:?}")
            })?;
        requested.insert(name.trim().to_owned(), bp);
    }
    let weights = canaryd::control::complete_weights(config, config.weights_bp(), &requested)
        .map_err(|e| e.to_string())?;
    WeightTable::new(weights, config.baseline).map_err(|e| e.to_string())
}

fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let threads = threads.or_else(|| {
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let mut builder = match threads {
        // One core: no work stealing, no cross-thread wake-ups (linkerd2-proxy does the same).
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build().map_err(|e| {
        tracing::error!(error = %e, "cannot start the async runtime");
        ExitCode::from(EXIT_RUNTIME)
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn run(path: PathBuf, threads: Option<usize>) -> ExitCode {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = match runtime(threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let path_display = path.display().to_string();
    let result = rt.block_on(async move {
        let listeners = canaryd::app::bind(&config).await?;
        canaryd::app::run(config, Some(path), listeners, termination()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ canaryd::app::AppError::Token { .. }) => {
            eprintln!("invalid config: {e}");
            ExitCode::from(EXIT_INVALID)
        }
        Err(e @ canaryd::app::AppError::Config(_)) => {
            eprintln!("{}: {e}", path_display);
            ExitCode::from(EXIT_INVALID)
        }
        Err(e) => {
            tracing::error!(error = %e, "canaryd stopped");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn demo(opts: canaryd::demo::DemoOptions, threads: Option<usize>) -> ExitCode {
    let rt = match runtime(threads) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(canaryd::demo::run(opts, termination())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ canaryd::demo::DemoError::BadErrorRate(_)) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_INVALID)
        }
        Err(e) => {
            tracing::error!(error = %e, "demo stopped");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn simulate(args: &SimulateArgs, threads: Option<usize>) -> ExitCode {
    use canaryd::analysis::simulate::{Behaviour, Scenario};
    use std::time::Duration;

    let config = match load(&args.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let usage = |msg: String| {
        eprintln!("canaryd simulate: {msg}");
        ExitCode::from(EXIT_INVALID)
    };
    let duration = match humantime::parse_duration(&args.duration) {
        Ok(d) if !d.is_zero() => d,
        _ => {
            return usage(format!(
                "--duration {:?}: expected a duration like \"10m\"",
                args.duration
            ))
        }
    };
    if !(args.rps.is_finite() && args.rps > 0.0) {
        return usage(format!("--rps {}: expected a positive number", args.rps));
    }
    let requests = (args.rps * duration.as_secs_f64()).round() as u64;
    if requests == 0 || requests > 1_000_000_000 {
        return usage(format!(
            "--rps x --duration gives {requests} requests per run; expected 1 to 10^9"
        ));
    }
    let weights = if args.weight.is_empty() {
        let canary = (0..config.upstreams.len()).find(|&i| i != config.baseline);
        match canary {
            Some(i) => vec![config.upstreams[i].weight_bp as f64 / 100.0],
            None => return usage("the config has no canary; give --weight".into()),
        }
    } else {
        args.weight.clone()
    };
    if let Some(w) = weights
        .iter()
        .find(|w| !(w.is_finite() && **w > 0.0 && **w <= 100.0))
    {
        return usage(format!(
            "--weight {w}: expected percents above 0 and at most 100"
        ));
    }
    let canary_error = args.canary_error.unwrap_or(args.baseline_error);
    for (flag, p) in [
        ("--baseline-error", args.baseline_error),
        ("--canary-error", canary_error),
    ] {
        if !(0.0..=1.0).contains(&p) {
            return usage(format!(
                "{flag} {p}: expected a fraction from 0 to 1 (0.01 is 1%)"
            ));
        }
    }
    let canary_latency = args.canary_latency_ms.unwrap_or(args.latency_ms);
    for (flag, ms) in [
        ("--latency-ms", args.latency_ms),
        ("--canary-latency-ms", canary_latency),
    ] {
        if !(ms.is_finite() && ms > 0.0 && ms < 3.6e6) {
            return usage(format!("{flag} {ms}: expected milliseconds above 0"));
        }
    }
    if !(args.latency_sigma.is_finite() && (0.0..=3.0).contains(&args.latency_sigma)) {
        return usage(format!(
            "--latency-sigma {}: expected 0 to 3",
            args.latency_sigma
        ));
    }
    if args.runs == 0 || args.runs > 10_000_000 {
        return usage(format!("--runs {}: expected 1 to 10^7", args.runs));
    }
    let behaviour = |error_rate, ms: f64| Behaviour {
        error_rate,
        median: Duration::from_secs_f64(ms / 1e3),
        sigma: args.latency_sigma,
    };
    let base = behaviour(args.baseline_error, args.latency_ms);
    let scenario = |canary| Scenario {
        limits: config.rollback.limits(),
        requests,
        rps: args.rps,
        weights: weights.iter().map(|w| w / 100.0).collect(),
        baseline: base,
        canary,
        check_every: canaryd::release::outcome::WAKE_AFTER as u64,
    };
    let identical = scenario(base);
    let regressed = behaviour(canary_error, canary_latency);
    let regression = (regressed != base).then(|| scenario(regressed));
    let threads = threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    let scenarios = 1 + u64::from(regression.is_some());
    let progress = Progress::new(args.runs * scenarios);
    let aa = progress.run(&identical, args.runs, args.seed, threads);
    let ab = regression
        .as_ref()
        .map(|sc| progress.run(sc, args.runs, args.seed ^ 0x5EED, threads));
    progress.finish();
    let report = canaryd::analysis::simulate::Report {
        identical: &identical,
        aa: &aa,
        regression: regression.as_ref().zip(ab.as_ref()),
    };
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.text());
    }
    ExitCode::SUCCESS
}

/// A progress bar on stderr for long simulations (only when stderr is a terminal).
struct Progress {
    total: u64,
    done: std::sync::atomic::AtomicU64,
    show: bool,
    started: std::time::Instant,
}

impl Progress {
    fn new(total: u64) -> Self {
        Progress {
            total,
            done: std::sync::atomic::AtomicU64::new(0),
            show: std::io::stderr().is_terminal(),
            started: std::time::Instant::now(),
        }
    }

    /// Runs a scenario while a second thread redraws the bar every 200 ms.
    fn run(
        &self,
        sc: &canaryd::analysis::simulate::Scenario,
        runs: u64,
        seed: u64,
        threads: usize,
    ) -> canaryd::analysis::simulate::Summary {
        use std::sync::atomic::Ordering;
        let finished = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            if self.show {
                s.spawn(|| {
                    while !finished.load(Ordering::Relaxed) {
                        self.draw();
                        std::thread::park_timeout(std::time::Duration::from_millis(200));
                    }
                });
            }
            let summary =
                canaryd::analysis::simulate::run_many(sc, runs, seed, threads, &self.done);
            finished.store(true, Ordering::Relaxed);
            summary
        })
    }

    fn draw(&self) {
        let done = self.done.load(std::sync::atomic::Ordering::Relaxed);
        let width = 30;
        let filled = (done * width / self.total.max(1)) as usize;
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = if done > 0 {
            elapsed * (self.total - done.min(self.total)) as f64 / done as f64
        } else {
            0.0
        };
        eprint!(
            "\r  [{}{}] {done}/{} runs, {elapsed:.0}s, about {eta:.0}s left ",
            "#".repeat(filled),
            " ".repeat(width as usize - filled),
            self.total
        );
    }

    fn finish(&self) {
        if self.show {
            self.draw();
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    /// The constructor ran in this process too (the test harness is this file), before
    /// mimalloc reserved its first arena: the option is off, not mimalloc's default of 2.
    #[cfg(target_os = "linux")]
    #[test]
    fn mimalloc_commits_its_arenas_lazily() {
        // SAFETY: reads one integer option.
        let eager = unsafe { super::mi_option_get(super::MI_OPTION_ARENA_EAGER_COMMIT) };
        assert_eq!(eager, 0);
    }

    #[test]
    fn rustls_is_held_to_errors_unless_rust_log_names_it() {
        assert_eq!(log_filter(None), "info,rustls=error");
        assert_eq!(log_filter(Some(" ")), "info,rustls=error");
        assert_eq!(log_filter(Some("debug")), "debug,rustls=error");
        assert_eq!(log_filter(Some("warn,rustls=debug")), "warn,rustls=debug");
    }
}
