//! Privileged tier: the kernel divides CPU between two saturated tenants by their weights.
//!
//! Two pools with weights 100 and 400 (1:4), both worker threads pinned to one CPU, each running
//! a job that never yields, until the light one has used 0.5 CPU seconds. The split is read from
//! the kernel's own per-thread accounting, so it is a ratio, not a wall-clock assertion.
//!
//! The tests are `#[ignore]`d: they need root (cgroups, nice values) and the flat one a cgroup
//! v1 cpu hierarchy. `scripts/test.sh` runs them as root with `--include-ignored`; asked to run
//! without what they need, they panic naming it instead of passing.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tenancy::cpu::{v1_shares, weight_to_nice};
use tenancy::{CpuControl, Isolation, Limits, Mechanism, Pools, TenantConfig};

const TENANTS: [(&str, u32); 2] = [("light", 100), ("heavy", 400)];

/// Panics unless we are root: the tests write cgroups or set other threads' nice values.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the cpu weight tests need root to write cgroups; run them as root \
         (scripts/test.sh, or `sudo -E cargo test -p tenancy --test cpu_weights -- --include-ignored`)"
    );
}

/// The cgroup v1 cpu hierarchy's mount, where there is one (the places `CpuControl` looks).
fn v1_cpu_root() -> Option<&'static Path> {
    ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("cpu.shares").exists())
}

/// Panics unless a cgroup v1 cpu hierarchy is mounted (flat tenant groups are cgroup v1 only).
fn require_v1_cpu() -> &'static Path {
    v1_cpu_root().unwrap_or_else(|| {
        panic!(
            "no cgroup v1 cpu hierarchy (no cpu.shares in /sys/fs/cgroup/cpu or \
             /sys/fs/cgroup/cpu,cpuacct): flat tenant groups are cgroup v1 only; run on a host \
             that mounts one (`mount -t cgroup -o cpu cgroup /sys/fs/cgroup/cpu`)"
        )
    })
}

#[test]
#[ignore = "needs root (writes cgroups or nice values); scripts/test.sh runs it as root (--include-ignored)"]
fn saturated_tenants_split_cpu_by_weight() {
    require_root();
    let cpu = CpuControl::detect("nodeproxy-test");
    if v1_cpu_root().is_some() {
        // cpu is bound to v1 there, so v2 cannot have it: detection must find v1, not nice.
        assert!(
            matches!(cpu.mechanism(), Mechanism::CgroupV1(_)),
            "a cgroup v1 cpu hierarchy is mounted but detect() chose {:?}",
            cpu.mechanism()
        );
    }
    split_by_weight(cpu);
}

/// The same with tenant groups flat in a parent group of their own (`--cgroup-parent`), where
/// the host has a cgroup v1 cpu hierarchy (this machine kind does).
#[test]
#[ignore = "needs root and a cgroup v1 cpu hierarchy (/sys/fs/cgroup/cpu); scripts/test.sh runs it as root (--include-ignored)"]
fn flat_tenant_groups_split_cpu_by_weight() {
    require_root();
    let root = require_v1_cpu();
    let parent = TestParent(root.join(format!("nodeproxy-flat-test-{}", std::process::id())));
    std::fs::create_dir_all(&parent.0).unwrap();
    let rel = parent.0.strip_prefix(root).unwrap();
    let cpu = CpuControl::v1_flat(rel, "np").unwrap();
    assert_eq!(
        cpu.kernel_weight(100),
        Some(v1_shares(100 * tenancy::cpu::FLAT_RELAY_FACTOR)),
        "flat groups are weighed against the pods beside them"
    );
    split_by_weight(cpu);
    // Our groups are gone after shutdown; only the parent the test made is left to remove.
    let left: Vec<_> = std::fs::read_dir(&parent.0)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "tenant groups left behind: {left:?}");
}

/// The parent group the flat test made; removed (best effort) however the test ends.
struct TestParent(PathBuf);

impl Drop for TestParent {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Shuts the pools down when dropped, so a failed assertion leaves no tenant group behind.
struct ShutDown(Pools<String>);

impl Drop for ShutDown {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// Stops the spinning jobs when dropped, so a failed assertion does not leave them running.
struct Spinning(Arc<AtomicBool>);

impl Drop for Spinning {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn split_by_weight(cpu: CpuControl) {
    eprintln!("mechanism: {:?}", cpu.mechanism());
    assert!(
        !matches!(cpu.mechanism(), Mechanism::None),
        "detect() must find a mechanism"
    );
    let guard = ShutDown(Pools::with(Isolation::PerTenant, cpu).unwrap());
    let pools = &guard.0;
    let wanted: BTreeMap<String, TenantConfig> = TENANTS
        .into_iter()
        .map(|(k, weight)| {
            let limits = Limits::default();
            (k.to_owned(), TenantConfig { weight, limits })
        })
        .collect();
    pools.reconcile(&wanted).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while pools.stats().iter().any(|(_, s)| s.tids[0] == 0) {
        assert!(Instant::now() < deadline, "pool threads not started in 5 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let tids: BTreeMap<String, i64> = pools
        .stats()
        .into_iter()
        .map(|(k, s)| (k, s.tids[0]))
        .collect();
    check_kernel_was_given_the_weights(pools.cpu(), &tids);
    // Both workers on CPU 0, so they must share it.
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(0).unwrap();
    for tid in tids.values() {
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(*tid as i32), &one_cpu).unwrap();
    }
    let used = spin_until_light_used(pools, 0.5);
    let ratio = used["heavy"] / used["light"];
    eprintln!("cpu seconds: {used:?}, heavy/light = {ratio:.2} (want 4 ± 10 %)");
    drop(guard);
    assert!(
        (3.6..=4.4).contains(&ratio),
        "kernel CPU split heavy/light = {ratio:.2}, want 4 ± 10 % ({used:?})"
    );
}

/// What the kernel was given: the weights (×4 in flat groups, see `FLAT_RELAY_FACTOR`) in
/// each tenant's group, or the nice values of the threads themselves.
fn check_kernel_was_given_the_weights(cpu: &CpuControl, tids: &BTreeMap<String, i64>) {
    let (base, file) = match cpu.mechanism() {
        Mechanism::CgroupV1(b) => (b, "cpu.shares"),
        Mechanism::CgroupV2(b) => (b, "cpu.weight"),
        Mechanism::Nice => {
            for (name, weight) in TENANTS {
                let nice = thread_nice(tids[name]);
                assert_eq!(nice, weight_to_nice(weight), "nice value of {name}");
            }
            return;
        }
        Mechanism::None => unreachable!("checked by split_by_weight"),
    };
    for (name, weight) in TENANTS {
        let dir = std::fs::read_dir(base)
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(name))
            .unwrap_or_else(|| panic!("no group for {name} in {}", base.display()));
        let got: u64 = std::fs::read_to_string(dir.path().join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(got, cpu.kernel_weight(weight).unwrap(), "{file} of {name}");
        let tasks = std::fs::read_to_string(dir.path().join(match file {
            "cpu.shares" => "tasks",
            _ => "cgroup.threads",
        }))
        .unwrap();
        assert!(
            tasks.lines().any(|t| t == tids[name].to_string()),
            "{name}'s thread {} is not in {}",
            tids[name],
            dir.path().display()
        );
    }
}

/// A thread's nice value, field 19 of `/proc/self/task/<tid>/stat`.
fn thread_nice(tid: i64) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace()
        .nth(19 - 3)
        .unwrap()
        .parse()
        .unwrap()
}

/// Runs a job on each pool that spins without yielding, until the light tenant has used
/// `light_seconds` of CPU (enough for the ratio to be precise, whatever else the machine is
/// doing); returns the CPU seconds each tenant used meanwhile.
fn spin_until_light_used(pools: &Pools<String>, light_seconds: f64) -> BTreeMap<String, f64> {
    let cpu_seconds = || -> BTreeMap<String, f64> {
        pools
            .stats()
            .into_iter()
            .map(|(k, s)| (k, s.cpu_seconds.unwrap()))
            .collect()
    };
    let before = cpu_seconds();
    let spinning = Spinning(Arc::new(AtomicBool::new(false)));
    for (k, _) in TENANTS {
        let stop = spinning.0.clone();
        pools
            .get(&k.to_owned())
            .unwrap()
            .spawn(move || async move {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_add(std::hint::black_box(1));
                }
                std::hint::black_box(x);
            })
            .unwrap();
    }
    let used = || -> BTreeMap<String, f64> {
        cpu_seconds()
            .into_iter()
            .map(|(k, s)| {
                let b = before[&k];
                (k, s - b)
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let u = used();
        if u["light"] >= light_seconds {
            return u;
        }
        assert!(
            Instant::now() < deadline,
            "in 60 s the light tenant used only {:.2} CPU seconds of {light_seconds} ({u:?})",
            u["light"]
        );
    }
}
