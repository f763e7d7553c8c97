//! The mesh context the tunnel needs at start: who signs the tenants' certificates.
//!
//! Owns [`mesh_context`]: with a remote control plane its `Identity.Certify` signs (after it
//! authorized this node); standalone, an embedded CA behind node authorization does.
//!
//! Must not touch: key material (the tenants' `certs::CertStore`s hold it, on their threads).

use std::sync::Arc;

use anyhow::Context as _;

use crate::admin::AdminState;

/// The mesh context. With a remote control plane, its `Identity.Certify` signs the tenants'
/// certificates; in standalone mode an embedded CA (from the operator's files, or generated in
/// memory) behind node authorization does.
pub(crate) fn mesh_context(
    t: &crate::config::TunnelConfig,
    state: &AdminState,
) -> anyhow::Result<crate::tunnel::Mesh> {
    let lifetime = std::time::Duration::from_secs(t.cert_lifetime_secs);
    if let Some(cp) = &state.config.control_plane {
        // The remote control plane's CA signs, after authorizing this node.
        let signer = crate::tunnel::signer::GrpcSigner::new(
            cp.endpoint.clone(),
            cp.token_file.clone(),
            lifetime,
        );
        return Ok(crate::tunnel::Mesh {
            signer: Arc::new(signer),
            rotation: certs::RotationOptions::default(),
            snapshot: state.snapshot.clone(),
        });
    }
    let td = &state.config.trust_domain;
    let ca = match &t.ca_files {
        Some((cert, key)) => certs::Ca::load_or_generate(td, cert, key)
            .with_context(|| format!("cannot load or create the CA at {}", cert.display()))?,
        None => {
            tracing::warn!(
                "no --ca-cert/--ca-key: using an in-memory CA that only this node trusts; \
                 tunnels to other nodes will be refused"
            );
            certs::Ca::generate(td)?
        }
    }
    .with_lifetime(lifetime);
    let signer =
        crate::tunnel::LocalCaSigner::new(ca, state.config.node.clone(), state.snapshot.clone());
    Ok(crate::tunnel::Mesh {
        signer: Arc::new(signer),
        rotation: certs::RotationOptions::default(),
        snapshot: state.snapshot.clone(),
    })
}
