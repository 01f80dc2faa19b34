//! Nodes finding the router on a LAN: mDNS / DNS-SD (`mdns-sd`). A node announces itself
//! ([`Announcer`]) as an instance of [`SERVICE_TYPE`] named after the node, with its RPC port and
//! a TXT record ([`Announcement`]: role, model fingerprint, KV layout, slots, version, whether its
//! links need the cluster file); the router browses ([`Browser`]) and hears [`Sighting`]s:
//! a node appearing (with the addresses it is reachable at) or leaving (its goodbye, sent when it
//! stops).
//!
//! An announcement is a claim, not a proof: the router still connects, says `hello` and checks
//! the model, the role and the KV layout, and with a cluster file the link's mutual TLS proves
//! membership. TXT values come from the network and are parsed with checks, never trusted.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use exo_kvcache::{KvLayout, KvType, ModelFingerprint};
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};

use crate::service::Role;

/// The DNS-SD service type every node announces.
pub const SERVICE_TYPE: &str = "_exo-router._tcp.local.";

/// Why discovery could not start, or an announcement was refused.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The mDNS daemon failed (no usable interface, socket errors).
    #[error("mDNS: {0}")]
    Mdns(#[from] mdns_sd::Error),
    /// A TXT value is missing or malformed.
    #[error("announcement of {name:?}: {field}: {why}")]
    Txt {
        /// The instance.
        name: String,
        /// The TXT key.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

/// What a node says about itself on the LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// Its name (the DNS-SD instance name).
    pub name: String,
    /// What it does.
    pub role: Role,
    /// Its RPC port.
    pub port: u16,
    /// The model it runs.
    pub fingerprint: ModelFingerprint,
    /// Its KV layout (`n_seq_max` is its slot count).
    pub layout: KvLayout,
    /// Its exo-router version.
    pub version: String,
    /// True when its links need the cluster file (mutual TLS).
    pub tls: bool,
}

impl Announcement {
    /// The TXT record.
    fn txt(&self) -> Vec<(&'static str, String)> {
        let l = &self.layout;
        vec![
            ("role", self.role.to_string()),
            ("model", self.fingerprint.to_hex()),
            (
                "kv",
                format!(
                    "{},{},{},{},{},{}",
                    l.type_k,
                    l.type_v,
                    u8::from(l.flash_attn),
                    u8::from(l.kv_unified),
                    l.n_seq_max,
                    l.n_ctx_seq
                ),
            ),
            ("version", self.version.clone()),
            ("tls", u8::from(self.tls).to_string()),
        ]
    }

    /// Reads an announcement of instance `name` on `port` from its TXT values.
    pub fn parse(
        name: &str,
        port: u16,
        txt: &HashMap<String, String>,
    ) -> Result<Announcement, DiscoveryError> {
        let bad = |field: &'static str, why: String| DiscoveryError::Txt {
            name: name.to_string(),
            field,
            why,
        };
        let get = |field: &'static str| {
            txt.get(field)
                .map(String::as_str)
                .ok_or_else(|| bad(field, "missing".into()))
        };
        let role = Role::from_str(get("role")?).map_err(|e| bad("role", e))?;
        let fingerprint = parse_fingerprint(get("model")?).map_err(|e| bad("model", e))?;
        let layout = parse_layout(get("kv")?).map_err(|e| bad("kv", e))?;
        let tls = match get("tls")? {
            "1" => true,
            "0" => false,
            other => return Err(bad("tls", format!("{other:?} is not 0 or 1"))),
        };
        let version = get("version")?;
        if version.len() > 64 {
            return Err(bad("version", "longer than 64 bytes".into()));
        }
        if name.is_empty() || name.len() > 63 {
            return Err(bad("name", "must be 1 to 63 bytes".into()));
        }
        Ok(Announcement {
            name: name.to_string(),
            role,
            port,
            fingerprint,
            layout,
            version: version.to_string(),
            tls,
        })
    }
}

fn parse_fingerprint(hex: &str) -> Result<ModelFingerprint, String> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("expected 64 hex digits".into());
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        let pair = hex.get(2 * i..2 * i + 2).ok_or("short")?;
        *b = u8::from_str_radix(pair, 16).map_err(|e| e.to_string())?;
    }
    Ok(ModelFingerprint(bytes))
}

fn parse_layout(text: &str) -> Result<KvLayout, String> {
    let parts: Vec<&str> = text.split(',').collect();
    let [k, v, fa, unified, slots, ctx] = parts[..] else {
        return Err("expected type_k,type_v,flash_attn,kv_unified,n_seq_max,n_ctx_seq".into());
    };
    let flag = |s: &str| match s {
        "1" => Ok(true),
        "0" => Ok(false),
        other => Err(format!("{other:?} is not 0 or 1")),
    };
    let number = |s: &str| s.parse::<u32>().map_err(|e| format!("{s:?}: {e}"));
    Ok(KvLayout {
        type_k: KvType::from_str(k).map_err(|e| e.to_string())?,
        type_v: KvType::from_str(v).map_err(|e| e.to_string())?,
        flash_attn: flag(fa)?,
        kv_unified: flag(unified)?,
        n_seq_max: number(slots)?,
        n_ctx_seq: number(ctx)?,
    })
}

/// Starts an mDNS daemon on the named interfaces (all of them, loopback included, when none are
/// named).
fn daemon(interfaces: &[String]) -> Result<ServiceDaemon, DiscoveryError> {
    let mdns = ServiceDaemon::new()?;
    if !interfaces.is_empty() {
        mdns.disable_interface(IfKind::All)?;
        for name in interfaces {
            mdns.enable_interface(IfKind::Name(name.clone()))?;
        }
    }
    Ok(mdns)
}

/// A node's announcement on the LAN, withdrawn (a goodbye the router hears) when dropped.
pub struct Announcer {
    mdns: ServiceDaemon,
    fullname: String,
}

impl Announcer {
    /// Announces `what` on `interfaces` (all when empty) from a host named `host`, at the
    /// addresses of those interfaces.
    pub fn start(
        what: &Announcement,
        host: &str,
        interfaces: &[String],
    ) -> Result<Announcer, DiscoveryError> {
        let mdns = daemon(interfaces)?;
        let host = format!("{}.local.", host.trim_end_matches('.'));
        let txt = what.txt();
        let props: Vec<(&str, &str)> = txt.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let info = ServiceInfo::new(SERVICE_TYPE, &what.name, &host, "", what.port, &props[..])?
            .enable_addr_auto();
        let fullname = info.get_fullname().to_string();
        mdns.register(info)?;
        Ok(Announcer { mdns, fullname })
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        // Unregistering sends the goodbye; wait (briefly) until it went out.
        if let Ok(done) = self.mdns.unregister(&self.fullname) {
            let _ = done.recv_timeout(std::time::Duration::from_secs(1));
        }
        let _ = self.mdns.shutdown();
    }
}

/// What the router hears while browsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sighting {
    /// A node announced itself (again, or with new addresses).
    Seen {
        /// What it said.
        announcement: Announcement,
        /// Where it can be reached: IPv4 before IPv6, other interfaces before loopback.
        addrs: Vec<SocketAddr>,
    },
    /// A node said goodbye (it is stopping).
    Gone {
        /// Its name.
        name: String,
    },
    /// An announcement that could not be read (logged, then ignored).
    Unreadable(String),
}

/// The router's side: browses [`SERVICE_TYPE`] until dropped.
pub struct Browser {
    mdns: ServiceDaemon,
    events: mdns_sd::Receiver<ServiceEvent>,
}

impl Browser {
    /// Starts browsing on `interfaces` (all when empty).
    pub fn start(interfaces: &[String]) -> Result<Browser, DiscoveryError> {
        let mdns = daemon(interfaces)?;
        let events = mdns.browse(SERVICE_TYPE)?;
        Ok(Browser { mdns, events })
    }

    /// The next sighting; `None` once the daemon stopped.
    pub async fn next(&self) -> Option<Sighting> {
        loop {
            match self.events.recv_async().await.ok()? {
                ServiceEvent::ServiceResolved(r) => {
                    let name = instance_name(r.get_fullname());
                    let txt: HashMap<String, String> = r
                        .get_properties()
                        .iter()
                        .map(|p| (p.key().to_string(), p.val_str().to_string()))
                        .collect();
                    let port = r.get_port();
                    // An IPv6 link-local address needs its interface to be dialled, which the
                    // address alone does not carry: left out.
                    let mut ips: Vec<IpAddr> = r
                        .get_addresses()
                        .iter()
                        .map(|a| a.to_ip_addr())
                        .filter(|ip| !is_link_local_v6(ip))
                        .collect();
                    ips.sort_by_key(|ip| (ip.is_ipv6(), ip.is_loopback(), *ip));
                    return Some(match Announcement::parse(&name, port, &txt) {
                        Ok(announcement) => Sighting::Seen {
                            announcement,
                            addrs: ips.into_iter().map(|ip| (ip, port).into()).collect(),
                        },
                        Err(e) => Sighting::Unreadable(e.to_string()),
                    });
                }
                ServiceEvent::ServiceRemoved(_, fullname) => {
                    return Some(Sighting::Gone {
                        name: instance_name(&fullname),
                    });
                }
                _ => {}
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.mdns.shutdown();
    }
}

/// True for an IPv6 link-local address (fe80::/10).
fn is_link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// `NAME` of `NAME._exo-router._tcp.local.`.
fn instance_name(fullname: &str) -> String {
    let suffix = format!(".{SERVICE_TYPE}");
    fullname
        .strip_suffix(&suffix)
        .unwrap_or(fullname)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Announcement {
        Announcement {
            name: "spark".into(),
            role: Role::Prefill,
            port: 52416,
            fingerprint: ModelFingerprint([7; 32]),
            layout: KvLayout {
                n_seq_max: 4,
                flash_attn: true,
                ..KvLayout::default()
            },
            version: "0.1.0".into(),
            tls: true,
        }
    }

    fn txt_of(a: &Announcement) -> HashMap<String, String> {
        a.txt()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    #[test]
    fn an_announcement_round_trips_through_its_txt_record() {
        let a = sample();
        assert_eq!(Announcement::parse("spark", 52416, &txt_of(&a)).unwrap(), a);
    }

    #[test]
    fn malformed_txt_values_are_refused_with_the_field() {
        let cases = [
            ("role", "router"),
            ("model", "abc"),
            ("model", &"zz".repeat(32)),
            ("kv", "f16,f16,0,0,4"),
            ("kv", "f16,f99,0,0,4,4096"),
            ("kv", "f16,f16,2,0,4,4096"),
            ("kv", "f16,f16,0,0,-1,4096"),
            ("tls", "yes"),
        ];
        for (field, value) in cases {
            let mut txt = txt_of(&sample());
            txt.insert(field.into(), value.into());
            let e = Announcement::parse("spark", 1, &txt)
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{field}={value}: {e}");
        }
        let mut txt = txt_of(&sample());
        txt.remove("model");
        assert!(Announcement::parse("spark", 1, &txt).is_err());
        assert!(Announcement::parse("", 1, &txt_of(&sample())).is_err());
    }

    #[test]
    fn link_local_v6_addresses_are_recognised() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(is_link_local_v6(&ip("fe80::1")));
        assert!(!is_link_local_v6(&ip("fd00::1")));
        assert!(!is_link_local_v6(&ip("10.0.0.1")));
    }

    #[test]
    fn instance_names_lose_the_service_type() {
        assert_eq!(instance_name("spark._exo-router._tcp.local."), "spark");
        assert_eq!(instance_name("odd"), "odd");
    }
}
