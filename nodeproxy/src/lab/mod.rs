//! The lab: throwaway network setups for the demo, for `nodeproxy lab` experiments and for the
//! privileged tests.
//!
//! Owns: building and tearing down network-namespace topologies ([`topology`], and the two-node
//! mesh topology [`twonode`]).
//! Must not touch: the host namespace's firewall, routes or sysctls; the data path.

pub mod topology;
pub mod twonode;
