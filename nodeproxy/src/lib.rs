//! nodeproxy: the per-node, multi-tenant proxy daemon.
//!
//! This crate owns the data path (capture → identify → admit → hand off → relay), the admin
//! and metrics endpoints, the daemon's lifecycle and its one configuration door, and the
//! `demo` and `lab` tools. Main types: [`config::Config`], [`app::Running`],
//! [`state::Snapshot`], [`outbound::Decision`].
//!
//! Must not touch: Kubernetes clients (only `controlplane` links `kube`), private keys (only
//! `certs` holds them), nftables syntax (only `redirect` renders it). Every tenant's work runs
//! in that tenant's pool from `tenancy`; the accept loop only classifies and hands off.

pub mod admin;
pub mod admin_client;
pub mod app;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod inbound;
pub mod lab;
pub mod metrics;
pub mod outbound;
pub mod outcome;
pub mod relay;
pub mod splice;
pub mod state;
pub mod tenant_listeners;
pub mod tunnel;
