//! The generated gRPC types of `proto/controlplane.proto` (package `nodeproxy.controlplane.v1`).
//!
//! Owns nothing hand-written but [`FILE_DESCRIPTOR_SET`], which serves gRPC reflection.
//! Must not touch: anything; conversions live in [`crate::convert`].

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

tonic::include_proto!("nodeproxy.controlplane.v1");

/// The encoded descriptors of our API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/controlplane_descriptor.bin"));
