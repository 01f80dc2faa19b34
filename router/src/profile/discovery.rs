//! The profile's `[discovery]` table: whether the router also takes nodes that announce
//! themselves on the LAN (mDNS, `exo_protocol::discovery`), and on which interfaces.

use serde::Deserialize;

/// Nodes found on the LAN, beside the profile's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovery {
    /// Browse for nodes (`discovery.enabled`; `serve --discover`, and `serve` without a
    /// profile).
    pub enabled: bool,
    /// Interfaces to browse on, by name (`discovery.interfaces`, `serve --discovery-interface`);
    /// empty: all of them.
    pub interfaces: Vec<String>,
}

/// `[discovery]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    interfaces: Vec<String>,
}

impl RawDiscovery {
    /// Typed values; interface names must be non-empty.
    pub(super) fn validate(self) -> Result<Discovery, String> {
        if let Some(bad) = self
            .interfaces
            .iter()
            .find(|i| i.trim().is_empty() || i.len() > 64)
        {
            return Err(format!(
                "discovery.interfaces: {bad:?} is not an interface name"
            ));
        }
        Ok(Discovery {
            enabled: self.enabled,
            interfaces: self.interfaces,
        })
    }
}
