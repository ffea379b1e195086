//! The `canaryd` command line: parses arguments, sets up logging, maps outcomes to exit codes.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use canaryd::config::Config;
use canaryd::routing::{fmt_percent, Source};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};

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
    },
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Route { config, key } => route(&config, &key),
        Command::Run { config } => run(config, cli.threads),
        Command::Demo {
            canary_error_rate,
            listen,
            admin,
        } => demo(
            canaryd::demo::DemoOptions {
                canary_error_rate,
                listen,
                admin,
            },
            cli.threads,
        ),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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

fn route(path: &Path, key: &str) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let table = config.weight_table();
    let mut headers = http::HeaderMap::new();
    let Ok(value) = http::HeaderValue::from_str(key) else {
        eprintln!("--key {key:?} cannot be sent as an HTTP header value");
        return ExitCode::from(EXIT_INVALID);
    };
    headers.insert(config.routing.sticky_header.clone(), value);
    let d = config.router().decide(&table, &headers);
    debug_assert_eq!(d.source, Source::Sticky);
    let bucket = d.bucket.unwrap_or_default();
    let (start, end) = table.range(d.arm);
    println!("key:    {key}");
    println!("bucket: {bucket}");
    println!("arm:    {}", config.upstreams[d.arm].name);
    println!(
        "why:    md5(salt ++ key) gives bucket {bucket}; {} serves buckets [{start}, {end})",
        config.upstreams[d.arm].name
    );
    ExitCode::SUCCESS
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
