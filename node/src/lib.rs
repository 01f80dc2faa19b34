//! exo-node: the daemon every machine of a cluster runs (`exo-router node`), and what it knows
//! about its machine.
//!
//! [`server`] serves the node RPC service (`exo-protocol`) over one llama.cpp context, with the
//! prefill side (`exo-prefill-node`) and/or the decode side (`exo-decode-node`) its role asks for.
//! [`hardware`] probes the machine (hwloc topology, NVIDIA GPUs through the CUDA driver loaded at
//! run time) and [`measure`] measures the model's speed on it; together they write the node's
//! `[nodes.perf]` profile entry that the router's cost model reads. The router never links this
//! crate: it talks to nodes over tarpc only.

pub mod hardware;
pub mod measure;
pub mod server;

pub use exo_decode_node::DecodeTimeouts;
pub use server::{NodeOptions, NodeServer, SpawnError, hardware_facts, spawn_node};
