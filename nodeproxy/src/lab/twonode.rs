//! A two-node topology for the mesh tunnel: nodes A and B, each a network namespace with its
//! own pods, joined by a veth "underlay" link. Built with the `ip` binary; dropping it removes
//! everything it created.
//!
//! Addressing (fixed; tests and the mTLS benchmark depend on it), for pod `i` (1-based, ≤ 254):
//! - node A: underlay `<prefix>u` `192.168.77.1/24`; pod `i` on A: `10.210.i.2/24`, gateway
//!   `10.210.i.1` (A's veth `<prefix>a<i>`);
//! - node B: underlay `<prefix>u` `192.168.77.2/24`; pod `i` on B: `10.220.i.2/24`, gateway
//!   `10.220.i.1` (B's veth `<prefix>b<i>`);
//! - A routes `10.220.0.0/16` via B's underlay address and B routes `10.210.0.0/16` via A's, so
//!   pods reach each other directly (the benchmark's baseline) or through the daemons.
//!
//! Namespaces: `<prefix>-a`, `<prefix>-b`, `<prefix>-a<i>`, `<prefix>-b<i>`.
//!
//! Must not touch: the host namespace (every `ip` call names a namespace), the existing
//! one-node [`super::topology::Topology`] and its users.

use std::net::Ipv4Addr;

use super::topology::{
    Netns, Result, TopologyError, check_privileges, delete_netns, ip, write_sysctl,
};

/// Node A's underlay address.
pub const NODE_A_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
/// Node B's underlay address.
pub const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);

/// Which node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Node A.
    A,
    /// Node B.
    B,
}

impl Side {
    fn letter(self) -> char {
        match self {
            Side::A => 'a',
            Side::B => 'b',
        }
    }

    fn octet(self) -> u8 {
        match self {
            Side::A => 210,
            Side::B => 220,
        }
    }
}

/// Two nodes with `pods` pods each, joined by an underlay link.
#[derive(Debug)]
pub struct TwoNodes {
    prefix: String,
    pods: usize,
    created: Vec<String>,
}

impl TwoNodes {
    /// Builds the topology; stale namespaces of the same prefix are removed first. On error,
    /// everything created so far is removed. The prefix must leave room for `b<i>` within 15
    /// characters.
    pub fn create(prefix: &str, pods: usize) -> Result<TwoNodes> {
        if prefix.is_empty()
            || prefix.len() + 4 > 15
            || !prefix.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(TopologyError::InvalidSpec(format!(
                "prefix {prefix:?} must be 1 to 11 letters or digits"
            )));
        }
        if !(1..=254).contains(&pods) {
            return Err(TopologyError::InvalidSpec(format!(
                "pods = {pods} must be in 1..=254"
            )));
        }
        check_privileges()?;
        let mut t = TwoNodes {
            prefix: prefix.to_owned(),
            pods,
            created: Vec::new(),
        };
        for name in t.all_names() {
            delete_netns(&name)?;
        }
        t.build()?;
        Ok(t)
    }

    fn all_names(&self) -> Vec<String> {
        let mut names = vec![
            self.node(Side::A).name().to_owned(),
            self.node(Side::B).name().to_owned(),
        ];
        for i in 1..=self.pods {
            names.push(self.pod(Side::A, i).name().to_owned());
            names.push(self.pod(Side::B, i).name().to_owned());
        }
        names
    }

    fn build(&mut self) -> Result<()> {
        for name in self.all_names() {
            ip(&["netns", "add", &name])?;
            self.created.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
        }
        let (a, b) = (self.node(Side::A), self.node(Side::B));
        write_sysctl(&a, "/proc/sys/net/ipv4/ip_forward", "1")?;
        write_sysctl(&b, "/proc/sys/net/ipv4/ip_forward", "1")?;
        let u = format!("{}u", self.prefix);
        #[rustfmt::skip]
        ip(&["-n", a.name(), "link", "add", &u, "type", "veth", "peer", "name", &u, "netns", b.name()])?;
        ip(&[
            "-n",
            a.name(),
            "addr",
            "add",
            &format!("{NODE_A_IP}/24"),
            "dev",
            &u,
        ])?;
        ip(&[
            "-n",
            b.name(),
            "addr",
            "add",
            &format!("{NODE_B_IP}/24"),
            "dev",
            &u,
        ])?;
        ip(&["-n", a.name(), "link", "set", &u, "up"])?;
        ip(&["-n", b.name(), "link", "set", &u, "up"])?;
        ip(&[
            "-n",
            a.name(),
            "route",
            "add",
            "10.220.0.0/16",
            "via",
            &NODE_B_IP.to_string(),
        ])?;
        ip(&[
            "-n",
            b.name(),
            "route",
            "add",
            "10.210.0.0/16",
            "via",
            &NODE_A_IP.to_string(),
        ])?;
        for side in [Side::A, Side::B] {
            for i in 1..=self.pods {
                self.wire_pod(side, i)?;
            }
        }
        Ok(())
    }

    fn wire_pod(&self, side: Side, i: usize) -> Result<()> {
        let node = self.node(side);
        let pod = self.pod(side, i);
        let veth = format!("{}{}{i}", self.prefix, side.letter());
        #[rustfmt::skip]
        ip(&["-n", node.name(), "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", pod.name()])?;
        ip(&[
            "-n",
            node.name(),
            "addr",
            "add",
            &format!("{}/24", self.gateway(side, i)),
            "dev",
            &veth,
        ])?;
        ip(&[
            "-n",
            pod.name(),
            "addr",
            "add",
            &format!("{}/24", self.pod_ip(side, i)),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", node.name(), "link", "set", &veth, "up"])?;
        ip(&["-n", pod.name(), "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            pod.name(),
            "route",
            "add",
            "default",
            "via",
            &self.gateway(side, i).to_string(),
        ])?;
        Ok(())
    }

    /// A node's namespace.
    pub fn node(&self, side: Side) -> Netns {
        Netns::from_name(format!("{}-{}", self.prefix, side.letter()))
    }

    /// Pod `i`'s namespace on a node.
    pub fn pod(&self, side: Side, i: usize) -> Netns {
        Netns::from_name(format!("{}-{}{i}", self.prefix, side.letter()))
    }

    /// Pod `i`'s address on a node.
    pub fn pod_ip(&self, side: Side, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, side.octet(), octet(i), 2)
    }

    /// The node's address on pod `i`'s link.
    pub fn gateway(&self, side: Side, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, side.octet(), octet(i), 1)
    }

    /// A node's underlay address.
    pub fn node_ip(&self, side: Side) -> Ipv4Addr {
        match side {
            Side::A => NODE_A_IP,
            Side::B => NODE_B_IP,
        }
    }

    /// Removes every namespace it created (killing what runs inside). Idempotent.
    pub fn cleanup(&mut self) -> Result<()> {
        let mut first = None;
        while let Some(name) = self.created.pop() {
            if let Err(e) = delete_netns(&name) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn octet(i: usize) -> u8 {
    u8::try_from(i).unwrap_or(u8::MAX)
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            tracing::warn!(error = %e, prefix = %self.prefix, "two-node topology cleanup failed");
        }
    }
}
