//! Classroom mode: the addresses students can join on, and QR codes for them.

use std::net::{IpAddr, Ipv4Addr};

use qrcode::QrCode;
use qrcode::render::{svg, unicode};

/// Client-page URLs for a server bound to `bind`, best first. Bound to every interface
/// (`0.0.0.0`), that is each usable IPv4 address of this machine (LAN first, loopback last);
/// bound to one address, just that one.
pub fn join_urls(bind: &str, port: u16, scheme: &str) -> Vec<String> {
    let addrs = match bind {
        "0.0.0.0" | "::" => {
            let found = if_addrs::get_if_addrs().unwrap_or_default();
            usable_ipv4(found.iter().map(|i| i.ip()))
        }
        "localhost" => vec![Ipv4Addr::LOCALHOST],
        other => match other.parse::<Ipv4Addr>() {
            Ok(a) => vec![a],
            // A host name or IPv6 literal: show it as given.
            Err(_) => return vec![format!("{scheme}://{}/", host_port(other, port))],
        },
    };
    addrs
        .iter()
        .map(|a| format!("{scheme}://{a}:{port}/"))
        .collect()
}

/// IPv4 addresses a phone on the same network could reach: not link-local, LAN before loopback.
pub fn usable_ipv4(ips: impl Iterator<Item = IpAddr>) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = ips
        .filter_map(|ip| match ip {
            IpAddr::V4(a) if !a.is_link_local() && !a.is_unspecified() && !a.is_multicast() => {
                Some(a)
            }
            _ => None,
        })
        .collect();
    v.sort_by_key(|a| (a.is_loopback(), !a.is_private(), *a));
    v.dedup();
    if v.is_empty() {
        v.push(Ipv4Addr::LOCALHOST);
    }
    v
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// True when only this machine can open the URL.
pub fn is_loopback_url(url: &str) -> bool {
    let host = url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .split([':', '/'])
        .next()
        .unwrap_or("");
    host == "localhost" || host.starts_with("127.")
}

/// The QR code as text for a terminal: light modules drawn, so it scans on a dark background.
pub fn qr_terminal(url: &str) -> Option<String> {
    let code = QrCode::new(url.as_bytes()).ok()?;
    Some(
        code.render::<unicode::Dense1x2>()
            .dark_color(unicode::Dense1x2::Light)
            .light_color(unicode::Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

/// The QR code as an SVG image (black on white) for the dashboard.
pub fn qr_svg(url: &str) -> Option<String> {
    let code = QrCode::new(url.as_bytes()).ok()?;
    Some(
        code.render::<svg::Color>()
            .min_dimensions(200, 200)
            .quiet_zone(true)
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_addresses_come_first_and_link_local_is_skipped() {
        let ips = [
            "127.0.0.1",
            "169.254.3.4",
            "192.168.1.20",
            "10.0.0.5",
            "::1",
        ]
        .map(|s| s.parse::<IpAddr>().unwrap());
        let v = usable_ipv4(ips.into_iter());
        assert_eq!(
            v,
            ["10.0.0.5", "192.168.1.20", "127.0.0.1"].map(|s| s.parse::<Ipv4Addr>().unwrap())
        );
        assert_eq!(usable_ipv4(std::iter::empty()), vec![Ipv4Addr::LOCALHOST]);
    }

    #[test]
    fn urls_for_one_address_and_qr_codes_render() {
        assert_eq!(
            join_urls("127.0.0.1", 8080, "http"),
            vec!["http://127.0.0.1:8080/".to_string()]
        );
        assert!(
            is_loopback_url("http://127.0.0.1:8080/")
                && !is_loopback_url("http://192.168.1.2:8080/")
        );
        assert!(
            join_urls("0.0.0.0", 80, "http")
                .iter()
                .all(|u| u.starts_with("http://") && u.ends_with(":80/"))
        );
        assert_eq!(
            join_urls("127.0.0.1", 8443, "https"),
            vec!["https://127.0.0.1:8443/".to_string()]
        );
        assert!(qr_svg("http://192.168.1.2:8080/").unwrap().contains("<svg"));
        assert!(
            qr_terminal("http://192.168.1.2:8080/")
                .unwrap()
                .lines()
                .count()
                > 10
        );
    }
}
