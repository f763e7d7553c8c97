//! The node's view of the world: Kubernetes-shaped objects translated into per-node views.
//!
//! This crate owns the sources of configuration and the translation every source shares:
//! [`objects`] parses Kubernetes objects ([`Objects`], `k8s-openapi` types) from YAML,
//! [`file`](mod@file) is the file source ([`FileSource`]) used by the standalone daemon and the demo,
//! and [`view`] turns objects into one node's [`NodeView`] (its local and remote meshed
//! [`Workload`]s and their identities). [`error`] collects every configuration problem into one
//! [`Error`]. A later change adds the gRPC API and the Kubernetes watcher, reusing the same
//! translation.
//!
//! Must not touch: sockets, the data path, the environment. Only this crate will link `kube`
//! (not yet), and its client part will stay usable without it.

pub mod error;
pub mod file;
pub mod objects;
pub mod view;

pub use error::{Error, Origin, Problem, Result};
pub use file::FileSource;
pub use objects::Objects;
pub use view::{MESH_ENABLED, MESH_LABEL, NodeView, Workload};
