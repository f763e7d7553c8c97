//! Server reflection as clients outside our code speak it: Python's official
//! `grpcio-reflection` client, which knows only v1alpha (like older grpcurl), lists the
//! control plane's services over TLS — verifying the server against its CA's certificate in a
//! file, like a node — and resolves the Discovery service's descriptor through reflection.
//!
//! Needs the venv that `scripts/install-deps.sh` makes (`scripts/test.sh` runs it first); no
//! root. Without it the test fails, naming the script.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use controlplane::auth::BootstrapTokens;
use controlplane::feed::FileInput;
use controlplane::server::Transport;

/// The venv `scripts/install-deps.sh` installs `grpcio` and `grpcio-reflection` into.
const VENV_PYTHON: &str = "/var/tmp/nodeproxy-venv/bin/python";

/// Lists services over reflection v1alpha (the client module speaks nothing else), then asks
/// for the file that defines Discovery and prints its methods.
const SCRIPT: &str = r#"
import sys
import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

target, ca_file = sys.argv[1], sys.argv[2]
with open(ca_file, "rb") as f:
    credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
with grpc.secure_channel(target, credentials) as channel:
    grpc.channel_ready_future(channel).result(timeout=20)
    database = ProtoReflectionDescriptorDatabase(channel)
    for service in database.get_services():
        print("service", service)
    discovery = DescriptorPool(database).FindServiceByName(
        "nodeproxy.controlplane.v1.Discovery"
    )
    for method in discovery.methods:
        print("method", discovery.full_name, method.name, method.input_type.full_name)
"#;

/// Starts the control plane (TLS, a certificate for 127.0.0.1 from a fresh CA) on the current
/// runtime; returns its address and writes the CA's certificate to `ca_file`.
fn start_control_plane(dir: &Path, ca_file: &Path) -> std::net::SocketAddr {
    let ca = Arc::new(certs::Ca::generate("cluster.local").unwrap());
    std::fs::write(ca_file, ca.root_pem()).unwrap();
    let names = certs::ServingNames::parse(["127.0.0.1"]).unwrap();
    let serving = certs::ServingCert::new(ca, names, Duration::from_secs(3600)).unwrap();
    let view = dir.join("view.yaml");
    std::fs::write(
        &view,
        include_str!("../../examples/authorization-policy.yaml"),
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    controlplane::server::spawn_with_file(
        tokio::net::TcpListener::from_std(listener).unwrap(),
        Transport::Tls(serving.server_config().unwrap()),
        FileInput::Path(view),
        "cluster.local",
        Arc::new(BootstrapTokens::single(
            "node-a-token-0123456789",
            Some("node-a".into()),
        )),
        Duration::from_secs(60),
    );
    addr
}

#[tokio::test]
async fn pythons_grpcio_reflection_lists_the_services_over_v1alpha_and_tls() {
    assert!(
        Path::new(VENV_PYTHON).exists(),
        "{VENV_PYTHON} is missing: run scripts/install-deps.sh (it makes the venv with grpcio \
         and grpcio-reflection; scripts/test.sh runs it first)"
    );
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    let addr = start_control_plane(dir.path(), &ca_file);
    let script = dir.path().join("reflect.py");
    std::fs::write(&script, SCRIPT).unwrap();

    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(VENV_PYTHON)
            .arg(&script)
            .arg(addr.to_string())
            .arg(&ca_file)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python client did not finish within 60 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python client failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        "service nodeproxy.controlplane.v1.Discovery",
        "service nodeproxy.controlplane.v1.Identity",
        "service grpc.health.v1.Health",
        "method nodeproxy.controlplane.v1.Discovery Watch nodeproxy.controlplane.v1.NodeRequest",
    ] {
        assert!(
            lines.contains(&want),
            "{want:?} not in:\n{stdout}\n{stderr}"
        );
    }
}
