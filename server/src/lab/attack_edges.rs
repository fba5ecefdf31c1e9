//! `canopy attack --edges K`: the attack table across K edge servers federated through a local
//! `nats-server -js`, a root running the rounds (every server a child process, as in
//! `canopy load --edges`). Each edge serves its share of the native simulated clients, with the
//! same number of attackers on every edge; the attack `partial:F` instead makes edge 1 a
//! compromised one that sends its partial's update ×F (its clients honest).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::lab::attack::Cell;
use crate::lab::load::edges::{read_root, spawn, start_nats};
use crate::lab::load::support::{free_port, wait_for_port};
use crate::lab::poison::{Attack, attackers};

/// What one cell of the table does to the run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EdgeAttack {
    /// `attackers` hostile clients on every edge.
    Clients(Attack),
    /// Edge 1 scales its partial's update by this factor.
    Partial(f64),
}

impl EdgeAttack {
    pub fn parse(s: &str) -> Result<EdgeAttack, String> {
        match s.trim().split_once(':') {
            Some(("partial", f)) => f
                .trim()
                .parse::<f64>()
                .map(EdgeAttack::Partial)
                .map_err(|_| format!("partial:F needs a factor, e.g. partial:-10 (got '{s}')")),
            _ => Attack::parse(s).map(EdgeAttack::Clients),
        }
    }

    pub fn name(&self) -> String {
        match self {
            EdgeAttack::Clients(a) => a.name(),
            EdgeAttack::Partial(f) => format!("edge 1's partial ×{f}"),
        }
    }
}

/// One run across `edges` edges: `config` (the cell's defence, rounds, data) with `per_edge`
/// hostile clients on each edge for a client attack. Its final and best test accuracy.
pub async fn cell(
    config: &Config,
    edges: usize,
    clients: usize,
    attack: EdgeAttack,
    per_edge: usize,
    run_dir: &Path,
) -> Result<Cell, String> {
    let t0 = Instant::now();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(run_dir);
    std::fs::create_dir_all(run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    let (_nats, url) = start_nats(run_dir).await?;
    let mut c = config.clone();
    c.scale.nats = url;
    // The root's run folder is the cell's: its metrics.json is read below.
    c.run.out_dir = run_dir
        .parent()
        .ok_or("a run folder without a parent")?
        .to_path_buf();
    c.run.linger = true;
    let toml_path = run_dir.join("cell.toml");
    std::fs::write(
        &toml_path,
        toml::to_string_pretty(&c).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let base = |role: &str, port: u16| -> Vec<String> {
        [
            "serve",
            "--config",
            &toml_path.display().to_string(),
            "--role",
            role,
            "--port",
            &port.to_string(),
        ]
        .map(String::from)
        .to_vec()
    };
    let mut servers = Vec::new();
    let mut ports = Vec::new();
    for k in 0..edges {
        let port = free_port()?;
        let mut a = base("edge", port);
        a.extend([
            "--edge-name".into(),
            format!("e{}", k + 1),
            "--edge-shards".into(),
            format!("{k}/{edges}"),
        ]);
        if let (EdgeAttack::Partial(f), 0) = (attack, k) {
            // One argument: a negative factor would read as a flag.
            a.push(format!("--lab-poison-partial={f}"));
        }
        let mut child = spawn(&exe, &a, run_dir.join(format!("edge-{}.log", k + 1)))?;
        wait_for_port(port, &mut child).await?;
        servers.push(child);
        ports.push(port);
    }
    let root_port = free_port()?;
    let mut root = spawn(&exe, &base("root", root_port), run_dir.join("root.log"))?;
    wait_for_port(root_port, &mut root).await?;

    let per = clients / edges;
    let sims: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(k, port)| {
            let plan: Vec<Attack> = match attack {
                EdgeAttack::Clients(a) => attackers(per, per_edge)
                    .into_iter()
                    .map(|hostile| if hostile { a } else { Attack::None })
                    .collect(),
                EdgeAttack::Partial(_) => vec![Attack::None; per],
            };
            let url = format!("ws://127.0.0.1:{port}/ws");
            tokio::task::spawn_blocking(move || {
                crate::lab::sim::run_many_attacking(
                    &url,
                    &plan,
                    &format!("sim-e{}", k + 1),
                    Duration::from_secs(60),
                )
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(3600);
    let records = loop {
        if let Ok(Some(status)) = root.try_wait() {
            return Err(format!(
                "the root exited ({status}); see {}",
                run_dir.join("root.log").display()
            ));
        }
        let (records, _) = read_root(run_dir);
        if records.len() as u32 >= c.run.rounds {
            break records;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the cell took over an hour; see {}",
                run_dir.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    drop(root);
    drop(servers);
    for s in sims {
        s.abort();
    }
    let accs: Vec<f32> = records.iter().map(|r| r.test_accuracy).collect();
    Ok(Cell {
        attack: attack.name(),
        attackers: match attack {
            EdgeAttack::Clients(Attack::None) | EdgeAttack::Partial(_) => 0,
            EdgeAttack::Clients(_) => per_edge,
        },
        defence: String::new(),
        final_acc: accs.last().copied().unwrap_or(0.0),
        best_acc: accs.iter().copied().fold(0.0, f32::max),
        // The edges' robust layers act on their own clients; not counted across edges here.
        flagged: 0,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
