//! `canopy attack`: attacks × defences on one data split with native simulated clients.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::{Config, Overrides, parse_defence, parse_partition};
use crate::lab::attack_edges::EdgeAttack;
use crate::lab::poison::{Attack, attackers};

#[derive(Clone, Debug, clap::Args)]
pub struct AttackArgs {
    /// Base TOML config (model, strategy settings...); the table's own settings override it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Attacks, comma separated (none, scale:F, constant:V, sign-flip, sign-flip:F, noise,
    /// label-flip).
    #[arg(
        long,
        default_value = "none,scale:1000,constant:1e6,sign-flip,sign-flip:10,noise,label-flip"
    )]
    pub attacks: String,
    /// Numbers of attackers among the clients, comma separated.
    #[arg(long, default_value = "1,3")]
    pub attackers: String,
    /// Defences, comma separated (none, default: the server's own, config: `--config`'s
    /// `[aggregation]` as written, norm-bound, median, trimmed-mean, multi-krum; +clip puts the
    /// norm bound in front).
    #[arg(
        long,
        default_value = "none,default,norm-bound,median,trimmed-mean,multi-krum,trimmed-mean+clip,median+clip"
    )]
    pub defences: String,
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    #[arg(long, default_value = "mnist-digits")]
    pub dataset: String,
    #[arg(long, default_value = "iid")]
    pub partition: String,
    #[arg(long, default_value = "runs/attack")]
    pub out_dir: PathBuf,
    /// Spread the clients over this many edge servers (and a root) through a local
    /// nats-server; `--attackers` then counts hostile clients per edge, and the attack
    /// `partial:F` makes edge 1 send its partial's update ×F.
    #[arg(long, default_value_t = 0)]
    pub edges: usize,
}

pub struct Cell {
    pub attack: String,
    pub attackers: usize,
    pub defence: String,
    pub final_acc: f32,
    pub best_acc: f32,
    pub flagged: u32,
    pub seconds: f64,
}

pub async fn run(args: AttackArgs) -> Result<Vec<Cell>, String> {
    let mut base = Config::load(&Overrides {
        config: args.config.clone(),
        ..Default::default()
    })?;
    base.data.dataset = args.dataset.clone();
    base.data.partition = parse_partition(&args.partition)?;
    base.data.shards = args.clients;
    base.run.rounds = args.rounds;
    base.run.min_clients = args.clients;
    base.run.min_results = 1;
    base.run.linger = false;
    base.server.port = 0;
    base.strategy.config.fraction = 1.0;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let out = args.out_dir.join(format!("attack-{stamp}"));
    base.run.out_dir = out.clone();
    let attacks: Vec<EdgeAttack> = args
        .attacks
        .split(',')
        .map(EdgeAttack::parse)
        .collect::<Result<_, _>>()?;
    if args.edges == 0 && attacks.iter().any(|a| matches!(a, EdgeAttack::Partial(_))) {
        return Err("the attack partial:F needs --edges".into());
    }
    if args.edges > 0 && !args.clients.is_multiple_of(args.edges) {
        return Err(format!(
            "--clients {} does not split evenly over --edges {}",
            args.clients, args.edges
        ));
    }
    let counts: Vec<usize> = args
        .attackers
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|e| format!("--attackers: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let defences: Vec<String> = args
        .defences
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    for d in &defences {
        parse_defence(d, &base.aggregation)?;
    }
    let mut cells = Vec::new();
    for attack in &attacks {
        // Without an attack the number of attackers means nothing: one row.
        let counts: Vec<usize> = match attack {
            EdgeAttack::Clients(Attack::None) | EdgeAttack::Partial(_) => vec![0],
            EdgeAttack::Clients(_) => counts.clone(),
        };
        for &k in &counts {
            for d in &defences {
                let mut c = base.clone();
                c.aggregation = parse_defence(d, &base.aggregation)?;
                c.run.name = Some(format!(
                    "{}-{k}-{}",
                    attack.name().replace([' ', '×', '\''], ""),
                    d.replace('+', "-")
                ));
                c.validate()?;
                // Across edges (`--edges 0`: one server, below).
                if let Some(per_edge) = args.clients.checked_div(args.edges) {
                    eprintln!(
                        "== attack {} by {k} of {per_edge} on each of {} edges, defence {d}",
                        attack.name(),
                        args.edges
                    );
                    let dir = out.join(c.run.name.clone().unwrap_or_default());
                    let mut cell = crate::lab::attack_edges::cell(
                        &c,
                        args.edges,
                        args.clients,
                        *attack,
                        k,
                        &dir,
                    )
                    .await?;
                    cell.defence = d.clone();
                    eprintln!(
                        "   final accuracy {:.4} ({:.0} s)",
                        cell.final_acc, cell.seconds
                    );
                    cells.push(cell);
                    continue;
                }
                let EdgeAttack::Clients(attack) = attack else {
                    unreachable!("refused above without --edges");
                };
                eprintln!(
                    "== attack {} by {k} of {}, defence {d}",
                    attack.name(),
                    args.clients
                );
                let t0 = Instant::now();
                let running = crate::start(c).await?;
                let url = format!("ws://{}/ws", running.addr);
                let plan: Vec<Attack> = attackers(args.clients, k)
                    .into_iter()
                    .map(|a| if a { *attack } else { Attack::None })
                    .collect();
                let sims = tokio::task::spawn_blocking(move || {
                    crate::lab::sim::run_many_attacking(&url, &plan, "sim", Duration::from_secs(30))
                });
                let app = running.app.clone();
                running.rounds.await.map_err(|e| e.to_string())?;
                let _ = sims.await;
                let hub = app.hub.lock().unwrap();
                let accs: Vec<f32> = hub.rounds().iter().map(|r| r.test_accuracy).collect();
                // Attackers are clients 1, 1 + n/k, ... (ids follow join order from 1).
                let flagged = hub
                    .clients()
                    .filter(|cl| {
                        cl.suspicion.clipped + cl.suspicion.down_weighted + cl.suspicion.rejected
                            > 0
                    })
                    .count() as u32;
                let cell = Cell {
                    attack: attack.name(),
                    attackers: k,
                    defence: d.clone(),
                    final_acc: accs.last().copied().unwrap_or(0.0),
                    best_acc: accs.iter().copied().fold(0.0, f32::max),
                    flagged,
                    seconds: t0.elapsed().as_secs_f64(),
                };
                eprintln!(
                    "   final accuracy {:.4} ({:.0} s)",
                    cell.final_acc, cell.seconds
                );
                cells.push(cell);
            }
        }
    }
    let md = markdown(&cells, &defences);
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    std::fs::write(out.join("attack.md"), &md).map_err(|e| e.to_string())?;
    let mut csv = String::from(
        "attack,attackers,defence,final_accuracy,best_accuracy,clients_flagged,seconds\n",
    );
    for c in &cells {
        csv.push_str(&format!(
            "{},{},{},{:.4},{:.4},{},{:.1}\n",
            c.attack, c.attackers, c.defence, c.final_acc, c.best_acc, c.flagged, c.seconds
        ));
    }
    std::fs::write(out.join("attack.csv"), csv).map_err(|e| e.to_string())?;
    println!("{md}");
    println!("saved in {}", out.display());
    Ok(cells)
}

/// One row per (attack, attackers), one column per defence: final accuracy.
pub fn markdown(cells: &[Cell], defences: &[String]) -> String {
    let mut s = format!(
        "| attack | attackers | {} |\n|---|---|{}\n",
        defences.join(" | "),
        "---|".repeat(defences.len())
    );
    let mut rows: Vec<(String, usize)> = Vec::new();
    for c in cells {
        if !rows.contains(&(c.attack.clone(), c.attackers)) {
            rows.push((c.attack.clone(), c.attackers));
        }
    }
    for (attack, k) in rows {
        let accs: Vec<String> = defences
            .iter()
            .map(|d| {
                cells
                    .iter()
                    .find(|c| c.attack == attack && c.attackers == k && &c.defence == d)
                    .map_or("–".into(), |c| format!("{:.4}", c.final_acc))
            })
            .collect();
        s.push_str(&format!(
            "| {attack} | {} | {} |\n",
            if k == 0 { "–".into() } else { k.to_string() },
            accs.join(" | ")
        ));
    }
    s
}
