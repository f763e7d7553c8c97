//! The lab: throwaway network setups for the demo, for `nodeproxy lab` experiments and for the
//! privileged tests.
//!
//! Owns: building and tearing down network-namespace topologies ([`topology`]).
//! Must not touch: the host namespace's firewall, routes or sysctls; the data path.

pub mod topology;
