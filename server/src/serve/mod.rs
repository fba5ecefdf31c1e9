//! Serving: the HTTP routes and static files ([`web`], [`precompressed`]), WebSocket sessions
//! ([`ws`] over [`upgrade`], read through the [`gate`], frames out through each client's [`outbox`]), connection
//! [`limits`], Prometheus' `/metrics` ([`prometheus`]), the dashboard's [`admin`] controls, the classroom's LAN join URLs ([`lan`]), and serving
//! over http or https ([`listen`], with the certificate from [`tls`]).

pub mod admin;
pub mod gate;
pub mod lan;
pub mod limits;
pub mod listen;
pub mod outbox;
pub mod precompressed;
pub mod prometheus;
pub mod tls;
pub mod upgrade;
pub mod web;
pub mod ws;
