//! Serving: the HTTP routes and static files ([`web`], [`precompressed`]), WebSocket sessions
//! ([`ws`] over [`upgrade`], frames out through each client's [`outbox`]), connection
//! [`limits`], the dashboard's [`admin`] controls and the classroom's LAN join URLs ([`lan`]).

pub mod admin;
pub mod lan;
pub mod limits;
pub mod outbox;
pub mod precompressed;
pub mod upgrade;
pub mod web;
pub mod ws;
