//! A profile's `[[nodes]]` entries: read, then checked one by one against those before them.

use std::path::PathBuf;

use exo_protocol::{NodePerf, Role};
use serde::Deserialize;

use super::{NodeAddress, NodeSpec};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    name: String,
    address: String,
    role: String,
    #[serde(default)]
    slots: Option<u32>,
    #[serde(default)]
    threads: Option<u32>,
    #[serde(default)]
    perf: Option<NodePerf>,
    /// The node's own model, when it is not the profile's.
    #[serde(default)]
    model: Option<PathBuf>,
    /// What `exo-router profile` found on the machine: informational, kept as written.
    #[serde(default)]
    #[allow(dead_code)]
    hardware: Option<toml::Table>,
}

impl RawNode {
    /// The node's entry, checked against the nodes before it.
    pub(super) fn validate(self, before: &[NodeSpec]) -> Result<NodeSpec, String> {
        let role: Role = self
            .role
            .parse()
            .map_err(|e| format!("node {:?}: {e}", self.name))?;
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err(format!(
                "node name {:?}: use letters, digits, '-', '_' or '.'",
                self.name
            ));
        }
        if before.iter().any(|m| m.name == self.name) {
            return Err(format!("node name {:?} appears twice", self.name));
        }
        let address = if self.address == "embedded" {
            NodeAddress::Embedded
        } else if self
            .address
            .rsplit_once(':')
            .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok())
        {
            NodeAddress::Remote(self.address)
        } else {
            return Err(format!(
                "node {:?}: address must be \"embedded\" or host:port",
                self.name
            ));
        };
        let slots = self.slots.unwrap_or(role.default_slots());
        if slots == 0 || slots > 256 {
            return Err(format!(
                "node {:?}: slots must be within 1..=256",
                self.name
            ));
        }
        match (self.threads, &address) {
            (Some(0), _) => {
                return Err(format!("node {:?}: threads must be at least 1", self.name));
            }
            (Some(_), NodeAddress::Remote(_)) => {
                return Err(format!(
                    "node {:?}: threads applies to embedded nodes; give a remote node --threads on its own command line",
                    self.name
                ));
            }
            _ => {}
        }
        if let Some(perf) = &self.perf {
            perf.validate()
                .map_err(|e| format!("node {:?} perf: {e}", self.name))?;
        }
        Ok(NodeSpec {
            name: self.name,
            address,
            role,
            slots,
            threads: self.threads,
            perf: self.perf,
            model: self.model,
        })
    }
}
