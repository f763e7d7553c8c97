//! The node's view of the world: Kubernetes-shaped objects translated into per-node views,
//! and the gRPC API that serves them.
//!
//! This crate owns the sources of configuration and the translation every source shares:
//! [`objects`] parses Kubernetes objects ([`Objects`], `k8s-openapi` and [`crd`] types) from
//! YAML, [`file`](mod@file) is the file source ([`FileSource`]), and [`view`] turns objects
//! into one node's [`NodeView`] (local and remote meshed [`Workload`]s, services, policies,
//! tenant settings). [`error`] collects every configuration problem into one [`Error`].
//! With feature `client`: [`api`] (generated gRPC types), [`convert`] (view ⇄ wire, deltas)
//! and [`client`] (the node's Watch client, and [`client::Target`]: how every client reaches
//! and verifies the control plane over TLS). With `server`: [`server`] (Discovery, Identity,
//! health, reflection v1 and v1alpha, over TLS or, in-process, plain text), [`auth`]
//! (bootstrap tokens; the node-token rule: only the daemon's ServiceAccount speaks for a
//! node), [`ca`] (`Identity.Certify`: signs only identities with a pod on the caller's node)
//! and [`feed`] (publication and the file watcher). With `kube`: [`kubernetes`] (watchers,
//! TokenReview, status conditions).
//!
//! Must not touch: the data path, the environment. Only this crate links `kube`, and only with
//! its `kube` feature; the client and the file-source server work without it.

#[cfg(feature = "client")]
pub mod api;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod ca;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
pub mod convert;
pub mod crd;
pub mod error;
#[cfg(feature = "server")]
pub mod feed;
pub mod file;
#[cfg(feature = "kube")]
pub mod kubernetes;
pub mod objects;
#[cfg(feature = "server")]
pub mod server;
pub mod view;

pub use error::{Error, Origin, Problem, Result};
pub use file::FileSource;
pub use objects::Objects;
pub use view::{MESH_ENABLED, MESH_LABEL, NodeView, TenantLimits, TenantSettings, Workload};
