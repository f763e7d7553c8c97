//! Test and demo network topologies: one "node" network namespace and N "pod" namespaces joined
//! to it by routed veth pairs. These are real kernel objects, created with the `ip` binary
//! (iproute2).
//!
//! Main types: [`TopologySpec`] (what to build), [`Topology`] (the built thing; dropping it removes
//! everything it created) and [`Netns`] (a handle to a named namespace that can run commands and
//! closures inside it).
//!
//! Addressing, fixed because the demo config depends on it. For pod `i` (1-based, at most
//! [`MAX_PODS`]):
//! - node side: veth `<prefix>h<i>` with `10.200.i.1/24` (and `fdfe:200:i::1/64`);
//! - pod side: `eth0` with `10.200.i.2/24` (and `fdfe:200:i::2/64`), default routes via the node.
//!
//! The IPv6 hextet is `i` written in decimal but read as hex, so pod 12 is `fdfe:200:12::2`, the
//! same digits as `10.200.12.2`.
//!
//! Must not touch: the host namespace's firewall, routes or sysctls (every `ip` call names a
//! namespace with `-n`, and sysctls are written from a thread that has entered the node
//! namespace); the data path. The node namespace has no uplink, so traffic never leaves the
//! topology.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where `ip netns add` puts its bind mounts.
const NETNS_DIR: &str = "/var/run/netns";
/// Longest interface name the kernel accepts (`IFNAMSIZ - 1`).
const MAX_IFNAME: usize = 15;
/// The most pods a topology can have: pod `i` owns the subnet `10.200.i.0/24`.
pub const MAX_PODS: usize = 254;

/// Errors from building or tearing down a topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The caller lacks the privileges to create namespaces.
    #[error(
        "creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN): run as root"
    )]
    NotRoot,
    /// A required binary is not on `PATH`.
    #[error("`{tool}` not found: install {package}")]
    MissingTool {
        /// The missing binary.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// The [`TopologySpec`] cannot be built.
    #[error("invalid topology spec: {0}")]
    InvalidSpec(String),
    /// An external command exited unsuccessfully.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line that failed.
        cmd: String,
        /// Its trimmed standard error (or exit status if it printed nothing).
        stderr: String,
    },
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Result type of this module.
pub type Result<T, E = TopologyError> = std::result::Result<T, E>;

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologySpec {
    /// Short name prefix, e.g. `npdemo`. Namespaces are `<prefix>-node` and `<prefix>-pod<i>`;
    /// node-side veths are `<prefix>h<i>`, which must fit in 15 characters. Letters, digits, `-`
    /// and `_` only.
    pub prefix: String,
    /// Number of pods, 1 to [`MAX_PODS`].
    pub pods: usize,
    /// Also configure IPv6 addresses and routes.
    pub ipv6: bool,
}

impl TopologySpec {
    fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(TopologyError::InvalidSpec(msg));
        if self.prefix.is_empty()
            || !self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return invalid(format!(
                "prefix {:?} must be non-empty and use only letters, digits, '-' and '_'",
                self.prefix
            ));
        }
        if self.pods == 0 || self.pods > MAX_PODS {
            return invalid(format!("pods = {} must be in 1..={MAX_PODS}", self.pods));
        }
        let longest = host_veth_name(&self.prefix, self.pods);
        if longest.len() > MAX_IFNAME {
            return invalid(format!(
                "interface name {longest:?} is longer than {MAX_IFNAME} characters: shorten prefix {:?}",
                self.prefix
            ));
        }
        Ok(())
    }
}

/// A built topology. Dropping it (also while unwinding from a panic) kills tracked child
/// processes and anything else still running in its namespaces, then deletes the namespaces.
#[derive(Debug)]
pub struct Topology {
    spec: TopologySpec,
    node: Netns,
    pods: Vec<Netns>,
    /// Names of namespaces this topology created and has not deleted yet.
    created: Vec<String>,
    children: Mutex<Vec<Child>>,
}

impl Topology {
    /// Builds the topology. Namespaces left behind with the same names (by a crashed previous
    /// run) are removed first. On error everything created so far is removed again.
    pub fn create(spec: TopologySpec) -> Result<Topology> {
        spec.validate()?;
        check_privileges()?;
        remove_stale(&spec.prefix)?;
        let node = Netns::from_name(format!("{}-node", spec.prefix));
        let pods = (1..=spec.pods)
            .map(|i| Netns::from_name(format!("{}-pod{i}", spec.prefix)))
            .collect();
        let mut topology = Topology {
            spec,
            node,
            pods,
            created: Vec::new(),
            children: Mutex::default(),
        };
        // If this fails, dropping `topology` removes the namespaces created so far.
        topology.build()?;
        Ok(topology)
    }

    fn build(&mut self) -> Result<()> {
        let names: Vec<String> = std::iter::once(&self.node)
            .chain(&self.pods)
            .map(|ns| ns.name.clone())
            .collect();
        for name in names {
            ip(&["netns", "add", &name])?;
            self.created.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
        }
        write_sysctl(&self.node, "/proc/sys/net/ipv4/ip_forward", "1")?;
        if self.spec.ipv6 {
            write_sysctl(&self.node, "/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
        }
        for i in 1..=self.spec.pods {
            self.wire_pod(i)?;
        }
        Ok(())
    }

    /// Creates pod `i`'s veth pair directly in the two namespaces (never in the host's), then
    /// addresses and routes.
    fn wire_pod(&self, i: usize) -> Result<()> {
        let node = self.node.name();
        let pod = self.pod(i).name();
        let host = self.host_veth(i);
        let cidr4 = |ip: Ipv4Addr| format!("{ip}/24");
        let cidr6 = |ip: Ipv6Addr| format!("{ip}/64");
        #[rustfmt::skip]
        ip(&["-n", node, "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", pod])?;
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &cidr4(node_ipv4(i)),
            "dev",
            &host,
        ])?;
        ip(&["-n", pod, "addr", "add", &cidr4(pod_ipv4(i)), "dev", "eth0"])?;
        if self.spec.ipv6 {
            // `nodad` makes the addresses usable at once instead of after duplicate detection.
            #[rustfmt::skip]
            ip(&["-n", node, "-6", "addr", "add", &cidr6(node_ipv6(i)), "dev", &host, "nodad"])?;
            #[rustfmt::skip]
            ip(&["-n", pod, "-6", "addr", "add", &cidr6(pod_ipv6(i)), "dev", "eth0", "nodad"])?;
        }
        ip(&["-n", node, "link", "set", &host, "up"])?;
        ip(&["-n", pod, "link", "set", "eth0", "up"])?;
        let gw4 = node_ipv4(i).to_string();
        ip(&["-n", pod, "route", "add", "default", "via", &gw4])?;
        if self.spec.ipv6 {
            let gw6 = node_ipv6(i).to_string();
            ip(&["-n", pod, "-6", "route", "add", "default", "via", &gw6])?;
        }
        Ok(())
    }

    /// The spec this topology was built from.
    pub fn spec(&self) -> &TopologySpec {
        &self.spec
    }

    /// The node namespace (where the proxy daemon runs).
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// Pod `i`'s namespace, 1-based. Panics if `i` is not in `1..=pods`.
    pub fn pod(&self, i: usize) -> &Netns {
        assert!(
            (1..=self.pods.len()).contains(&i),
            "pod index {i} out of range 1..={}",
            self.pods.len()
        );
        &self.pods[i - 1]
    }

    /// All pod namespaces; `pods()[0]` is pod 1.
    pub fn pods(&self) -> &[Netns] {
        &self.pods
    }

    /// Name of pod `i`'s veth in the node namespace, `<prefix>h<i>`.
    pub fn host_veth(&self, i: usize) -> String {
        host_veth_name(&self.spec.prefix, i)
    }

    /// Pod `i`'s address, `10.200.i.2`.
    pub fn pod_ip(&self, i: usize) -> Ipv4Addr {
        pod_ipv4(i)
    }

    /// The node's address on pod `i`'s link (pod `i`'s gateway), `10.200.i.1`.
    pub fn node_ip_for_pod(&self, i: usize) -> Ipv4Addr {
        node_ipv4(i)
    }

    /// Pod `i`'s IPv6 address, `fdfe:200:i::2`, or `None` if the topology is IPv4-only.
    pub fn pod_ip6(&self, i: usize) -> Option<Ipv6Addr> {
        self.spec.ipv6.then(|| pod_ipv6(i))
    }

    /// The node's IPv6 address on pod `i`'s link, `fdfe:200:i::1`, or `None` if IPv4-only.
    pub fn node_ip6_for_pod(&self, i: usize) -> Option<Ipv6Addr> {
        self.spec.ipv6.then(|| node_ipv6(i))
    }

    /// Hands a child process (typically started with [`Netns::command`]) to the topology, which
    /// kills and reaps it before deleting the namespaces.
    pub fn track(&self, child: Child) {
        self.children
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(child);
    }

    /// Kills tracked children and any other process left in the namespaces, then deletes the
    /// namespaces. Idempotent; [`Drop`] calls it too. Returns the first error but keeps going.
    pub fn cleanup(&mut self) -> Result<()> {
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(PoisonError::into_inner));
        for mut child in children {
            // Errors mean the child already exited; `wait` reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut first_error = None;
        while let Some(name) = self.created.pop() {
            if let Err(e) = delete_netns(&name) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            tracing::warn!(error = %e, prefix = %self.spec.prefix, "topology cleanup failed");
        }
    }
}

/// A named network namespace (`/var/run/netns/<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// A handle to the namespace called `name`. It need not exist yet; operations fail if it
    /// does not exist when they run.
    pub fn from_name(name: impl Into<String>) -> Netns {
        let name = name.into();
        let path = Path::new(NETNS_DIR).join(&name);
        Netns { name, path }
    }

    /// The namespace's name, as `ip netns` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind-mount path, `/var/run/netns/<name>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that runs `program` inside the namespace
    /// (`nsenter --net=/var/run/netns/<name> <program>`). nsenter execs the program directly, so
    /// the child's pid is the program's pid. Unlike `ip netns exec`, it does not remount `/sys`,
    /// so the program still sees the host's cgroup filesystem, as a hostNetwork pod does.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and waits for it. Sockets `f`
    /// creates belong to the namespace (and keep belonging to it when moved to other threads).
    /// Threads `f` spawns inherit the namespace. A panic in `f` is resumed on the caller.
    pub fn run<F, R>(&self, f: F) -> io::Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.open()?;
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(self.thread_name())
                .spawn_scoped(scope, move || -> io::Result<R> {
                    enter(&file)?;
                    drop(file);
                    Ok(f())
                })?;
            match thread.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Like [`Netns::run`], but detached: returns once the new thread has entered the namespace
    /// (or reports why it could not), leaving `f` running. For servers.
    pub fn spawn<F, R>(&self, f: F) -> io::Result<JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open()?;
        let (entered_tx, entered_rx) = mpsc::sync_channel(1);
        let handle =
            std::thread::Builder::new()
                .name(self.thread_name())
                .spawn(move || match enter(&file) {
                    Ok(()) => {
                        drop(file);
                        let _ = entered_tx.send(Ok(()));
                        f()
                    }
                    Err(e) => {
                        let _ = entered_tx.send(Err(e));
                        // Nobody joins this thread: end it without running `f` and without the
                        // panic hook printing anything.
                        std::panic::resume_unwind(Box::new("could not enter network namespace"))
                    }
                })?;
        entered_rx
            .recv()
            .map_err(|_| io::Error::other("namespace thread ended before entering"))??;
        Ok(handle)
    }

    fn open(&self) -> io::Result<File> {
        File::open(&self.path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("open network namespace {}: {e}", self.path.display()),
            )
        })
    }

    fn thread_name(&self) -> String {
        format!("netns:{}", self.name)
    }

    /// True if the calling thread is inside this namespace.
    fn is_current_thread_in(&self) -> io::Result<bool> {
        let ours = std::fs::metadata("/proc/thread-self/ns/net")?;
        let target = std::fs::metadata(&self.path)?;
        Ok(ours.dev() == target.dev() && ours.ino() == target.ino())
    }
}

/// Moves the calling thread into the namespace `file` refers to.
fn enter(file: &File) -> io::Result<()> {
    setns(file, CloneFlags::CLONE_NEWNET)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("setns: {e}")))
}

/// Writes a per-namespace sysctl from a thread inside `ns`, after checking that the thread really
/// is inside `ns`, so the host's value can never be the one changed.
pub(super) fn write_sysctl(ns: &Netns, path: &str, value: &str) -> Result<()> {
    let io_err = |source: io::Error| TopologyError::Io {
        context: format!("set {path} = {value} in network namespace {}", ns.name),
        source,
    };
    ns.run(|| {
        if !ns.is_current_thread_in()? {
            return Err(io::Error::other("thread is not in the target namespace"));
        }
        std::fs::write(path, value)
    })
    .and_then(|r| r)
    .map_err(io_err)
}

/// Pod `i`'s IPv4 address, `10.200.i.2`. Panics if `i` is not in `1..=MAX_PODS`.
pub fn pod_ipv4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, subnet_octet(i), 2)
}

/// The node's IPv4 address on pod `i`'s link, `10.200.i.1`. Panics if `i` is not in
/// `1..=MAX_PODS`.
pub fn node_ipv4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, subnet_octet(i), 1)
}

/// Pod `i`'s IPv6 address, `fdfe:200:i::2` (`i`'s decimal digits as the hextet).
pub fn pod_ipv6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfdfe, 0x200, subnet_hextet(i), 0, 0, 0, 0, 2)
}

/// The node's IPv6 address on pod `i`'s link, `fdfe:200:i::1`.
pub fn node_ipv6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfdfe, 0x200, subnet_hextet(i), 0, 0, 0, 0, 1)
}

fn subnet_octet(i: usize) -> u8 {
    assert!(
        (1..=MAX_PODS).contains(&i),
        "pod index {i} out of range 1..={MAX_PODS}"
    );
    // In range by the assert: MAX_PODS < 256.
    i as u8
}

/// `i`'s decimal digits read as hex (12 -> 0x12), so v4 and v6 addresses share digits.
fn subnet_hextet(i: usize) -> u16 {
    let i = u16::from(subnet_octet(i));
    (i / 100) << 8 | (i / 10 % 10) << 4 | (i % 10)
}

fn host_veth_name(prefix: &str, i: usize) -> String {
    format!("{prefix}h{i}")
}

/// True if the effective user is root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The first executable called `tool` on `PATH`.
pub fn which(tool: &str) -> Option<PathBuf> {
    which::which(tool).ok()
}

/// Checks what [`Topology::create`] and [`Netns::command`] need: root, `ip` and `nsenter`.
pub fn check_privileges() -> Result<()> {
    if !is_root() {
        return Err(TopologyError::NotRoot);
    }
    for (tool, package) in [("ip", "iproute2"), ("nsenter", "util-linux")] {
        if which(tool).is_none() {
            return Err(TopologyError::MissingTool { tool, package });
        }
    }
    Ok(())
}

/// Runs `ip <args>`, turning failure into an error that names the command and its stderr.
pub(super) fn ip(args: &[&str]) -> Result<String> {
    let cmd_line = || format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => TopologyError::MissingTool {
                tool: "ip",
                package: "iproute2",
            },
            _ => TopologyError::Io {
                context: format!("run `{}`", cmd_line()),
                source: e,
            },
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(TopologyError::Command {
            cmd: cmd_line(),
            stderr: if stderr.is_empty() {
                output.status.to_string()
            } else {
                stderr
            },
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// True if `name` is one of the namespaces a topology with `prefix` creates.
fn belongs_to(prefix: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    rest == "node"
        || rest
            .strip_prefix("pod")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Deletes namespaces a crashed run with the same prefix left behind.
fn remove_stale(prefix: &str) -> Result<()> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(TopologyError::Io {
                context: format!("list {NETNS_DIR}"),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if belongs_to(prefix, &name) {
            tracing::info!(netns = %name, "removing stale network namespace");
            delete_netns(&name)?;
        }
    }
    Ok(())
}

/// Kills every process inside namespace `name` (they were started there by us or by a crashed
/// run of ours, and would keep the namespace alive), then deletes its name.
pub(super) fn delete_netns(name: &str) -> Result<()> {
    if !Path::new(NETNS_DIR).join(name).exists() {
        return Ok(());
    }
    let own = std::process::id();
    for pid in ip(&["netns", "pids", name])?
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|&p| u32::try_from(p).is_ok_and(|p| p != own))
    {
        // ESRCH (already gone) is fine.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    ip(&["netns", "del", name]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_fixed_plan() {
        assert_eq!(pod_ipv4(3).to_string(), "10.200.3.2");
        assert_eq!(node_ipv4(254).to_string(), "10.200.254.1");
        assert_eq!(pod_ipv6(1).to_string(), "fdfe:200:1::2");
        assert_eq!(node_ipv6(12).to_string(), "fdfe:200:12::1");
        assert_eq!(pod_ipv6(254).to_string(), "fdfe:200:254::2");
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn pod_zero_is_rejected() {
        let _ = pod_ipv4(0);
    }

    #[test]
    fn specs_are_validated() {
        let spec = |prefix: &str, pods| TopologySpec {
            prefix: prefix.into(),
            pods,
            ipv6: false,
        };
        assert!(spec("npdemo", 3).validate().is_ok());
        assert!(spec("abcdefghijk", 254).validate().is_ok()); // "abcdefghijkh254" is 15
        assert!(spec("abcdefghijkl", 9).validate().is_ok()); // "abcdefghijklh9" is 14
        for bad in [
            spec("", 1),
            spec("a b", 1),
            spec("a/b", 1),
            spec("np", 0),
            spec("np", 255),
            spec("abcdefghijkl", 100), // "abcdefghijklh100" is 16
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stale_matching_is_exact() {
        assert!(belongs_to("np1", "np1-node"));
        assert!(belongs_to("np1", "np1-pod12"));
        assert!(!belongs_to("np1", "np10-node"));
        assert!(!belongs_to("np1", "np1-pod"));
        assert!(!belongs_to("np1", "np1-podx"));
        assert!(!belongs_to("np1", "np1-nodes"));
        assert!(!belongs_to("np", "np1-node"));
    }
}
