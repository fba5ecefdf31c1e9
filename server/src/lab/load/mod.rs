//! `canopy load`: the server alone under many clients. Thousands of lightweight protocol
//! clients (tokio tasks, not threads, in this process) join a real `canopy serve` started as a
//! child process, and answer every task at once with a synthetic, valid update (no training).
//! The server's peak resident memory (VmHWM) and CPU time are read from /proc, so the figures are
//! the server's own, not the load generator's.

pub mod edges;
pub mod single;
pub mod support;

use single::{LoadRow, one, print_ratios, print_rows};
use support::{LoadArgs, raise_fd_limit};

pub async fn run(args: LoadArgs) -> Result<Vec<LoadRow>, String> {
    raise_fd_limit();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for &n in &args.clients {
        for mode in &args.modes {
            if mode == "buffered" && n >= args.buffered_max {
                println!(
                    "skipping {n} clients buffered (--buffered-max {})",
                    args.buffered_max
                );
                continue;
            }
            let row = one(&exe, &args, n, mode).await?;
            print_rows(std::slice::from_ref(&row));
            rows.push(row);
        }
    }
    let mut spread = Vec::new();
    for &n in &args.clients {
        for &k in args.edges.iter().filter(|k| **k > 0) {
            let row = edges::one(&exe, &args, n, k).await?;
            edges::print_rows(std::slice::from_ref(&row));
            spread.push(row);
        }
    }
    println!();
    print_rows(&rows);
    print_ratios(&rows);
    if !spread.is_empty() {
        println!();
        edges::print_rows(&spread);
        for e in &spread {
            if let Some(s) = rows
                .iter()
                .find(|r| r.mode == "streaming" && r.clients == e.clients)
            {
                println!(
                    "{} clients over {} edges / one server: round time {:.2}×, busiest server's CPU per round {:.2}× (root {:.2} s, each edge {:.2} s, one server {:.2} s)",
                    e.clients,
                    e.edges,
                    e.round_s / s.round_s.max(1e-9),
                    e.root_cpu_s.max(e.edge_cpu_s) / s.server_cpu_s.max(1e-9),
                    e.root_cpu_s,
                    e.edge_cpu_s,
                    s.server_cpu_s
                );
            }
        }
    }
    Ok(rows)
}
