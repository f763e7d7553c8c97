//! Privileged tier: the kernel divides CPU between two saturated tenants by their weights.
//!
//! Two pools with weights 100 and 400 (1:4), both worker threads pinned to one CPU, each running
//! a job that never yields, until the light one has used 0.5 CPU seconds. The split is read from
//! the kernel's own per-thread accounting, so it is a ratio, not a wall-clock assertion. Needs root (cgroups); skips
//! locally without it and fails under `CI=true`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tenancy::{CpuControl, Isolation, Limits, Mechanism, Pools, TenantConfig};

fn privileged() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if root {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("cpu weight test needs root to write cgroups; privileged tests fail under CI");
    }
    eprintln!("skipping: the cpu weight test needs root");
    false
}

#[test]
fn saturated_tenants_split_cpu_by_weight() {
    if !privileged() {
        return;
    }
    split_by_weight(CpuControl::detect("nodeproxy-test"));
}

/// The same with tenant groups flat in a parent group of their own (`--cgroup-parent`), where
/// the host has a cgroup v1 cpu hierarchy (this machine kind does).
#[test]
fn flat_tenant_groups_split_cpu_by_weight() {
    if !privileged() {
        return;
    }
    let root = std::path::Path::new("/sys/fs/cgroup/cpu");
    if !root.join("cpu.shares").exists() {
        eprintln!("skipping: no cgroup v1 cpu hierarchy on this host (flat groups are v1 only)");
        return;
    }
    let parent = format!("nodeproxy-flat-test-{}", std::process::id());
    std::fs::create_dir_all(root.join(&parent)).unwrap();
    let cpu = CpuControl::v1_flat(std::path::Path::new(&parent), "np").unwrap();
    split_by_weight(cpu);
    // Our groups are gone after shutdown; only the parent the test made is left to remove.
    let left: Vec<_> = std::fs::read_dir(root.join(&parent))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    std::fs::remove_dir(root.join(&parent)).unwrap();
    assert!(left.is_empty(), "tenant groups left behind: {left:?}");
}

fn split_by_weight(cpu: CpuControl) {
    eprintln!("mechanism: {:?}", cpu.mechanism());
    assert!(
        !matches!(cpu.mechanism(), Mechanism::None),
        "detect() must find a mechanism"
    );
    let kernel = |w: u32| cpu.kernel_weight(w).unwrap();
    let (light_kernel, heavy_kernel) = (kernel(100), kernel(400));
    let base = match cpu.mechanism() {
        Mechanism::CgroupV1(b) => Some((b.clone(), "cpu.shares")),
        Mechanism::CgroupV2(b) => Some((b.clone(), "cpu.weight")),
        _ => None,
    };
    let pools: Pools<String> = Pools::with(Isolation::PerTenant, cpu).unwrap();
    let wanted: BTreeMap<String, TenantConfig> = [("light", 100), ("heavy", 400)]
        .into_iter()
        .map(|(k, weight)| {
            (
                k.to_owned(),
                TenantConfig {
                    weight,
                    limits: Limits::default(),
                },
            )
        })
        .collect();
    pools.reconcile(&wanted).unwrap();
    let pool = |k: &str| pools.get(&k.to_owned()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while pools.stats().iter().any(|(_, s)| s.tids[0] == 0) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    // What the kernel was given: the weights, ×4 in flat groups (see FLAT_RELAY_FACTOR).
    if let Some((base, file)) = &base {
        for (name, want) in [("light", light_kernel), ("heavy", heavy_kernel)] {
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
            assert_eq!(got, want, "{file} of {name}");
        }
    }
    // Both workers on CPU 0, so they must share it.
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(0).unwrap();
    for (_, s) in pools.stats() {
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(s.tids[0] as i32), &one_cpu)
            .unwrap();
    }
    let before: BTreeMap<String, f64> = pools
        .stats()
        .into_iter()
        .map(|(k, s)| (k, s.cpu_seconds.unwrap()))
        .collect();
    // Each job spins without yielding until told to stop; stop once the light tenant has used
    // enough CPU for the ratio to be precise, whatever else the machine is doing.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for k in ["light", "heavy"] {
        let stop = stop.clone();
        pool(k)
            .spawn(move || async move {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_add(std::hint::black_box(1));
                }
                std::hint::black_box(x);
            })
            .unwrap();
    }
    let used = |pools: &Pools<String>| -> BTreeMap<String, f64> {
        pools
            .stats()
            .into_iter()
            .map(|(k, s)| {
                let b = before[&k];
                (k, s.cpu_seconds.unwrap() - b)
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let used = loop {
        std::thread::sleep(Duration::from_millis(100));
        let u = used(&pools);
        if u["light"] >= 0.5 || Instant::now() > deadline {
            break u;
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ratio = used["heavy"] / used["light"];
    eprintln!("cpu seconds: {used:?}, heavy/light = {ratio:.2} (want 4 ± 10 %)");
    pools.shutdown();
    assert!(
        (3.6..=4.4).contains(&ratio),
        "kernel CPU split heavy/light = {ratio:.2}, want 4 ± 10 % ({used:?})"
    );
}
