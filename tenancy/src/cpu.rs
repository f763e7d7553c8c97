//! CPU fair share between tenants, enforced by the kernel, and per-thread CPU accounting.
//!
//! Owns [`CpuControl`]: it puts each pool's thread into a per-tenant CPU cgroup with a weight,
//! using the best mechanism the host offers:
//! - **cgroup v2** (`/sys/fs/cgroup` is cgroup2 with the `cpu` controller): threaded child
//!   groups of the daemon's own cgroup, `cpu.weight`, threads moved via `cgroup.threads`;
//! - **cgroup v1** (a `cpu` hierarchy is mounted): child groups of the daemon's own cpu cgroup,
//!   `cpu.shares`, threads moved via `tasks`;
//! - **nice**: where neither is writable, per-thread nice values approximate the weights
//!   (one nice step is about ×1.25 of CPU weight);
//! - **none**: placement switched off (the shared-runtime comparison mode).
//!
//! This is ~200 lines of our own cgroupfs code rather than `cgroups-rs`, because cgroups-rs
//! hard-codes `/sys/fs/cgroup` as the only v2 mount, pulls zbus and an old nix (minutes of
//! build), and we need only mkdir, four files and rmdir (see `docs/ARCHITECTURE.md`).
//!
//! Must not touch: sockets; any cgroup outside the daemon's own subtree.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The mechanism in force, as shown in `/tenants`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    /// cgroup v2 threaded groups under this directory.
    CgroupV2(PathBuf),
    /// cgroup v1 cpu groups under this directory.
    CgroupV1(PathBuf),
    /// Per-thread nice values.
    Nice,
    /// No CPU placement.
    None,
}

impl Mechanism {
    /// A short name: `cgroup-v2`, `cgroup-v1`, `nice` or `none`.
    pub fn name(&self) -> &'static str {
        match self {
            Mechanism::CgroupV2(_) => "cgroup-v2",
            Mechanism::CgroupV1(_) => "cgroup-v1",
            Mechanism::Nice => "nice",
            Mechanism::None => "none",
        }
    }
}

/// The default weight (as cgroup v2's `cpu.weight`).
pub const DEFAULT_WEIGHT: u32 = 100;

/// Flat tenant groups (cgroup v1, [`CpuControl::v1_flat`]) stand beside the pods, so their
/// weight is also a share *against pods*, not only against other tenants. There a tenant's
/// weight is multiplied by this factor: weight 100 is worth four 1-CPU pods (`cpu.shares` 4096).
///
/// Why: a relay thread does the socket work of both ends of every connection it carries.
/// Measured in the fairness benchmark (2 vCPUs, `scripts/bench-fairness.sh`), the victim's pool
/// thread used 45–50 % of a CPU while its client and server pods used about 20 % each during
/// ping-pong, and 70–79 % against 37 % and 19 % while opening connections: 2.2–2.7 pods' worth.
/// At one pod's weight the relay's fair share beside a busy neighbour's three threads is below
/// that demand, so it waits, runnable, and its pods' requests wait with it (p99 ×1.3–2.8,
/// connection rate ×0.65–0.77). The factor gives it headroom over the measured ×2.7.
///
/// A larger weight takes nothing from pods a relay does not serve: its work is derived from its
/// pods' traffic, which their own weights bound (and a connection storm, its tenant's limits).
/// It stays one thread, so one CPU at most. Relative weights between tenants are unchanged.
pub const FLAT_RELAY_FACTOR: u32 = 4;

/// The largest `cpu.shares` cgroup v1 accepts.
const V1_MAX_SHARES: u64 = 1 << 18;

/// Places pool threads in per-tenant CPU groups.
#[derive(Debug, Clone)]
pub struct CpuControl {
    mechanism: Mechanism,
    /// Prefix of tenant group names inside the mechanism's directory: empty when the directory
    /// is our own `<group>/<pid>`, `<group>-<pid>-` when groups sit flat in a shared parent.
    prefix: String,
    /// The EEVDF slice given to every placed thread (`None`: the kernel's default).
    slice: Option<Duration>,
    /// Tenant weights are multiplied by this before they reach the kernel: 1, or
    /// [`FLAT_RELAY_FACTOR`] for groups beside the pods.
    factor: u32,
}

impl CpuControl {
    /// No placement at all.
    pub fn none() -> Self {
        Self {
            mechanism: Mechanism::None,
            prefix: String::new(),
            slice: None,
            factor: 1,
        }
    }

    /// Per-thread nice values only.
    pub fn nice() -> Self {
        Self {
            mechanism: Mechanism::Nice,
            prefix: String::new(),
            slice: None,
            factor: 1,
        }
    }

    /// cgroup v1 only: tenant groups directly inside `parent` (a path below the cpu hierarchy's
    /// mount, e.g. `kubepods`), as siblings of the pods there, named `<group>-<pid>-<tenant>`.
    /// A light tenant then keeps its own scheduling lag instead of sharing one with every busy
    /// tenant of the daemon's group. Weights are multiplied by [`FLAT_RELAY_FACTOR`] there. cgroup v2 cannot move threads out of the daemon's own
    /// subtree, so there this is an error.
    pub fn v1_flat(parent: &Path, group: &str) -> io::Result<Self> {
        let root = v1_root()?;
        let base = root.join(parent.strip_prefix("/").unwrap_or(parent));
        if !base.join("cpu.shares").exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a cgroup v1 cpu group", base.display()),
            ));
        }
        let prefix = format!("{group}-{}-", std::process::id());
        remove_stale_flat(&base, group);
        tracing::info!(mechanism = "cgroup-v1", parent = %base.display(), "tenant CPU groups beside the pods");
        Ok(Self {
            mechanism: Mechanism::CgroupV1(base),
            prefix,
            slice: None,
            factor: FLAT_RELAY_FACTOR,
        })
    }

    /// Picks the best writable mechanism: cgroup v2, then v1, then nice. `group` names our
    /// subtree (e.g. `nodeproxy`) under the daemon's own cgroup; this process's tenants live in
    /// `<group>/<pid>/<tenant>`, and groups left by dead processes are removed.
    pub fn detect(group: &str) -> Self {
        let group = format!("{group}/{}", std::process::id());
        let group = group.as_str();
        let mechanism = detect_v2(group)
            .map(Mechanism::CgroupV2)
            .or_else(|e| {
                tracing::debug!(error = %e, "cgroup v2 cpu control not usable");
                detect_v1(group).map(Mechanism::CgroupV1)
            })
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "cgroup v1 cpu control not usable");
                Mechanism::Nice
            });
        tracing::info!(mechanism = mechanism.name(), "tenant CPU share mechanism");
        Self {
            mechanism,
            prefix: String::new(),
            slice: None,
            factor: 1,
        }
    }

    /// Gives every thread placed from now on an EEVDF slice of `slice` (see [`set_slice`]);
    /// `None` keeps the kernel's default.
    pub fn with_slice(mut self, slice: Option<Duration>) -> Self {
        self.slice = slice;
        self
    }

    /// The slice placed threads get, if one was asked for.
    pub fn slice(&self) -> Option<Duration> {
        self.slice
    }

    /// The mechanism in force.
    pub fn mechanism(&self) -> &Mechanism {
        &self.mechanism
    }

    /// What a tenant `weight` (1..=10000) becomes in the kernel: `cpu.weight` (cgroup v2) or
    /// `cpu.shares` (cgroup v1; ×[`FLAT_RELAY_FACTOR`] for groups beside the pods); `None`
    /// where no cgroup is written.
    pub fn kernel_weight(&self, weight: u32) -> Option<u64> {
        let weight = weight.clamp(1, 10_000);
        match &self.mechanism {
            Mechanism::CgroupV2(_) => Some(u64::from(weight)),
            Mechanism::CgroupV1(_) => {
                Some(v1_shares(weight.saturating_mul(self.factor)).min(V1_MAX_SHARES))
            }
            Mechanism::Nice | Mechanism::None => None,
        }
    }

    /// Puts thread `tid` into tenant `slug`'s group with `weight` (1..=10000).
    pub fn place(&self, slug: &str, tid: i64, weight: u32) -> io::Result<()> {
        let kernel = self.kernel_weight(weight).unwrap_or_default().to_string();
        let weight = weight.clamp(1, 10_000);
        // The slice first: sched_setattr also resets nice, which the nice mechanism sets below.
        if let Some(slice) = self.slice
            && let Err(e) = set_slice(tid, slice)
        {
            tracing::warn!(tid, error = %e, "cannot set the pool thread's scheduler slice; it keeps the kernel's default");
        }
        match &self.mechanism {
            Mechanism::CgroupV2(base) => {
                let dir = base.join(format!("{}{slug}", self.prefix));
                ensure_dir(&dir)?;
                // Children of a threaded root must be threaded before threads can join.
                if fs::read_to_string(dir.join("cgroup.type"))?.trim() != "threaded" {
                    fs::write(dir.join("cgroup.type"), "threaded")?;
                }
                fs::write(dir.join("cpu.weight"), kernel)?;
                fs::write(dir.join("cgroup.threads"), tid.to_string())
            }
            Mechanism::CgroupV1(base) => {
                let dir = base.join(format!("{}{slug}", self.prefix));
                ensure_dir(&dir)?;
                fs::write(dir.join("cpu.shares"), kernel)?;
                fs::write(dir.join("tasks"), tid.to_string())
            }
            Mechanism::Nice => set_nice(tid, weight_to_nice(weight)),
            Mechanism::None => Ok(()),
        }
    }

    /// Removes tenant `slug`'s group once its threads are gone (best effort).
    pub fn remove(&self, slug: &str) {
        if let Mechanism::CgroupV1(base) | Mechanism::CgroupV2(base) = &self.mechanism {
            let _ = fs::remove_dir(base.join(format!("{}{slug}", self.prefix)));
        }
    }

    /// Removes this process's whole subtree (best effort; at shutdown, after the pools).
    pub fn cleanup(&self) {
        let (Mechanism::CgroupV1(base) | Mechanism::CgroupV2(base)) = &self.mechanism else {
            return;
        };
        if !self.prefix.is_empty() {
            // Flat groups in a shared parent: only ours.
            if let Ok(entries) = fs::read_dir(base) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&self.prefix) {
                        remove_tree(&e.path());
                    }
                }
            }
            return;
        }
        remove_tree(base);
        // The shared parent goes too once no other daemon uses it.
        if let Some(parent) = base.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// Removes flat groups `<group>-<pid>-*` of daemons that are gone.
fn remove_stale_flat(base: &Path, group: &str) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    let head = format!("{group}-");
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&head)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            remove_tree(&e.path());
        }
    }
}

/// Removes empty cgroup directories bottom-up (cgroupfs refuses to remove groups with tasks).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Removes the subtrees of daemons that are gone (`<parent>/<pid>` with no such process).
fn remove_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            remove_tree(&e.path());
        }
    }
}

/// Creates `base` and the directories above it up to `root`, clearing stale siblings.
fn ensure_tree(root: &Path, base: &Path) -> io::Result<()> {
    if let Some(parent) = base.parent()
        && parent != root
    {
        ensure_dir(parent)?;
        remove_stale(parent);
    }
    ensure_dir(base)
}

/// cgroup v1 `cpu.shares` for a v2-style weight (100 → 1024).
pub fn v1_shares(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).max(2)
}

/// The nice value whose CFS weight is closest to `weight` relative to 100 (nice 0).
pub fn weight_to_nice(weight: u32) -> i32 {
    let ratio = f64::from(weight.max(1)) / f64::from(DEFAULT_WEIGHT);
    (-(ratio.ln() / 1.25f64.ln())).round().clamp(-20.0, 19.0) as i32
}

fn ensure_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

/// Our own cgroup path for a controller, from `/proc/self/cgroup`.
fn own_cgroup(controller: Option<&str>) -> io::Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        let matches = match controller {
            None => controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        if matches {
            return Ok(PathBuf::from(path.trim_start_matches('/')));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no {controller:?} line in /proc/self/cgroup"),
    ))
}

fn detect_v2(group: &str) -> io::Result<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let controllers = fs::read_to_string(root.join("cgroup.controllers"))?;
    if !controllers.split_whitespace().any(|c| c == "cpu") {
        return Err(io::Error::other(
            "the cpu controller is not on the v2 hierarchy",
        ));
    }
    // Our own cgroup becomes the threaded root; its cpu controller must reach its children.
    // Never turn the host's root cgroup into that.
    let own_rel = own_cgroup(None)?;
    if own_rel.as_os_str().is_empty() {
        return Err(io::Error::other(
            "the daemon runs in the root cgroup; give it a cgroup of its own (a pod does)",
        ));
    }
    let own = root.join(own_rel);
    fs::write(own.join("cgroup.subtree_control"), "+cpu")?;
    let base = own.join(group);
    ensure_tree(&own, &base)?;
    for dir in [base.parent().unwrap_or(&base), &base] {
        if fs::read_to_string(dir.join("cgroup.type"))?.trim() != "threaded" {
            fs::write(dir.join("cgroup.type"), "threaded")?;
        }
        fs::write(dir.join("cgroup.subtree_control"), "+cpu")?;
    }
    Ok(base)
}

/// The mount point of the cgroup v1 cpu hierarchy.
fn v1_root() -> io::Result<&'static Path> {
    ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("cpu.shares").exists())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v1 cpu hierarchy"))
}

fn detect_v1(group: &str) -> io::Result<PathBuf> {
    let root = v1_root()?;
    let own = root.join(own_cgroup(Some("cpu"))?);
    let base = own.join(group);
    ensure_tree(&own, &base)?;
    // Proves we may write here, not just create directories.
    let shares = base.join("cpu.shares");
    let current = fs::read_to_string(&shares)?;
    fs::write(&shares, current.trim())?;
    Ok(base)
}

/// Sets a thread's nice value.
#[allow(unsafe_code)]
fn set_nice(tid: i64, nice: i32) -> io::Result<()> {
    let id = libc::id_t::try_from(tid).map_err(|_| io::Error::other("bad thread id"))?;
    // SAFETY: setpriority takes plain integers and touches no memory of ours; with
    // PRIO_PROCESS and a thread id it changes only that thread's nice value.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, id, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The shortest and longest slice the kernel accepts (it clamps to these).
pub const SLICE_RANGE: (Duration, Duration) =
    (Duration::from_micros(100), Duration::from_millis(100));

/// `struct sched_attr`, version 0 (48 bytes), as in `include/uapi/linux/sched/types.h`.
#[repr(C)]
#[derive(Debug, PartialEq, Eq)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// What `sched_setattr` is given for a slice: SCHED_OTHER, nice 0, `sched_runtime` = the slice
/// clamped to [`SLICE_RANGE`] (as the kernel would clamp it) in nanoseconds.
fn slice_attr(slice: Duration) -> SchedAttr {
    let slice = slice.clamp(SLICE_RANGE.0, SLICE_RANGE.1);
    SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        sched_deadline: 0,
        sched_period: 0,
    }
}

/// Gives thread `tid` an EEVDF slice of `slice` (Linux 6.12+: `sched_attr.sched_runtime` of a
/// SCHED_OTHER thread). A short slice does not change the thread's CPU share (its cgroup
/// weight does); it gives the thread an earlier virtual deadline, so when it wakes it runs
/// sooner instead of waiting for a busy thread's whole slice (1.4 ms by default on a 2-CPU
/// machine). A proxy's work per wakeup is short, so all its pool threads ask for one.
/// Resets the thread's nice value to 0: callers set nice after this.
#[allow(unsafe_code)]
pub fn set_slice(tid: i64, slice: Duration) -> io::Result<()> {
    let tid = libc::pid_t::try_from(tid).map_err(|_| io::Error::other("bad thread id"))?;
    let attr = slice_attr(slice);
    // SAFETY: sched_setattr reads `attr.size` bytes from a pointer to a properly laid-out,
    // initialized `struct sched_attr` that lives across the call; it writes nothing of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            tid,
            &attr as *const SchedAttr,
            0u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The `se.slice` line of a `/proc/<pid>/task/<tid>/sched` text, if there is one.
fn parse_slice(sched: &str) -> Option<Duration> {
    let line = sched.lines().find(|l| l.starts_with("se.slice"))?;
    let ns: u64 = line.rsplit(':').next()?.trim().parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// A thread's current EEVDF slice as the kernel reports it (`se.slice` in
/// `/proc/self/task/<tid>/sched`), if it does.
pub fn thread_slice(tid: i64) -> Option<Duration> {
    parse_slice(&fs::read_to_string(format!("/proc/self/task/{tid}/sched")).ok()?)
}

/// CPU time a thread of this process has used, from the kernel's own accounting
/// (`/proc/self/task/<tid>/schedstat`, nanoseconds on CPU).
pub fn thread_cpu_seconds(tid: i64) -> Option<f64> {
    let text = fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_map_to_each_mechanism() {
        assert_eq!(v1_shares(100), 1024);
        assert_eq!(v1_shares(400), 4096);
        assert_eq!(v1_shares(25), 256);
        assert_eq!(weight_to_nice(100), 0);
        // ×4 weight ≈ 6 nice steps of ×1.25.
        assert_eq!(weight_to_nice(400), -6);
        assert_eq!(weight_to_nice(25), 6);
        assert_eq!(weight_to_nice(10_000), -20);
        assert_eq!(weight_to_nice(1), 19);
    }

    #[test]
    fn flat_groups_weigh_a_relay_against_pods() {
        let flat = CpuControl {
            mechanism: Mechanism::CgroupV1("/x".into()),
            prefix: "np-1-".into(),
            slice: None,
            factor: FLAT_RELAY_FACTOR,
        };
        assert_eq!(flat.kernel_weight(100), Some(4096));
        assert_eq!(flat.kernel_weight(25), Some(1024));
        // cgroup v1's ceiling, not an error.
        assert_eq!(flat.kernel_weight(10_000), Some(1 << 18));
        let nested = CpuControl {
            prefix: String::new(),
            factor: 1,
            ..flat
        };
        assert_eq!(nested.kernel_weight(100), Some(1024));
        assert_eq!(nested.kernel_weight(0), Some(10));
        assert_eq!(CpuControl::nice().kernel_weight(100), None);
    }

    /// The calling thread's kernel id.
    fn own_tid() -> i64 {
        fs::read_link("/proc/thread-self")
            .ok()
            .and_then(|p| p.file_name()?.to_str()?.parse().ok())
            .expect("our thread id from /proc/thread-self")
    }

    #[test]
    fn a_slice_is_encoded_as_sched_attr_version_0_and_clamped() {
        // The kernel reads these offsets (include/uapi/linux/sched/types.h, SCHED_ATTR_SIZE_VER0).
        assert_eq!(std::mem::size_of::<SchedAttr>(), 48);
        assert_eq!(std::mem::offset_of!(SchedAttr, sched_nice), 16);
        assert_eq!(std::mem::offset_of!(SchedAttr, sched_runtime), 24);
        assert_eq!(std::mem::offset_of!(SchedAttr, sched_period), 40);
        let attr = slice_attr(Duration::from_micros(300));
        assert_eq!(
            attr,
            SchedAttr {
                size: 48,
                sched_policy: libc::SCHED_OTHER as u32,
                sched_flags: 0,
                sched_nice: 0,
                sched_priority: 0,
                sched_runtime: 300_000,
                sched_deadline: 0,
                sched_period: 0,
            }
        );
        // Out-of-range requests are clamped, not refused.
        let runtime = |d| slice_attr(d).sched_runtime;
        assert_eq!(runtime(Duration::from_nanos(1)), 100_000);
        assert_eq!(runtime(Duration::ZERO), 100_000);
        assert_eq!(runtime(Duration::from_secs(1)), 100_000_000);
        assert_eq!(runtime(Duration::MAX), 100_000_000);
    }

    #[test]
    fn the_slice_is_read_from_the_sched_text() {
        let text = "x (1, #threads: 2)\n----\nse.vruntime   :   42.5\n\
                    se.slice                                     :              1400000\n\
                    policy :  0\n";
        assert_eq!(parse_slice(text), Some(Duration::from_micros(1400)));
        assert_eq!(parse_slice("se.vruntime : 1\npolicy : 0\n"), None);
        assert_eq!(parse_slice("se.slice : many\n"), None);
    }

    #[test]
    #[ignore = "needs Linux >= 6.12 (se.slice in /proc/<pid>/task/<tid>/sched, set by \
                sched_setattr); scripts/test.sh runs it as root (--include-ignored)"]
    fn a_slice_set_on_a_thread_is_what_the_kernel_reports() {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        // A fresh thread, so the test runner's threads keep their slices.
        std::thread::spawn(move || {
            let tid = own_tid();
            let reported = || {
                thread_slice(tid).unwrap_or_else(|| {
                    panic!(
                        "kernel {} reports no se.slice in /proc/self/task/{tid}/sched; \
                         run this test on Linux >= 6.12",
                        release.trim()
                    )
                })
            };
            for (asked, want) in [
                (Duration::from_micros(300), Duration::from_micros(300)),
                (Duration::from_nanos(1), SLICE_RANGE.0),
                (Duration::from_secs(1), SLICE_RANGE.1),
            ] {
                set_slice(tid, asked).expect("sched_setattr");
                assert_eq!(
                    reported(),
                    want,
                    "asked for {asked:?} on kernel {}; kernels before 6.12 accept the call but \
                     keep their own slice",
                    release.trim()
                );
            }
        })
        .join()
        .expect("slice thread");
    }

    #[test]
    fn thread_cpu_time_is_read_from_the_kernel() {
        let tid = own_tid();
        let before = thread_cpu_seconds(tid).expect("schedstat of our own thread");
        let start = std::time::Instant::now();
        let deadline = start + Duration::from_secs(10);
        let mut x = 0u64;
        // Spin until the kernel has charged 20 ms to this thread, however busy the machine.
        let used = loop {
            for _ in 0..10_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            let used = thread_cpu_seconds(tid).expect("schedstat") - before;
            if used >= 0.02 {
                break used;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "10 s of spinning charged only {used} s"
            );
        };
        assert!(x > 0);
        // One thread cannot run longer than the wall clock: catches a wrong unit.
        let wall = start.elapsed().as_secs_f64();
        assert!(used <= wall + 0.005, "{used} s on CPU in {wall} s");
    }
}
