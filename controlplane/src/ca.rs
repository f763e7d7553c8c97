//! The Identity service (`Identity.Certify`): signs workload CSRs for nodes.
//!
//! Owns [`IdentityService`]. Not implemented yet: every call is authenticated like a Watch and
//! then answered `UNIMPLEMENTED`. The mesh issue fills in the signing (with `certs`'s CA) here,
//! checking that the identity has a pod on the calling node.
//!
//! Must not touch: private keys (they stay in `certs`), the view's sources.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::identity_server::Identity;
use crate::api::{CertifyRequest, CertifyResponse};
use crate::auth::{self, Authenticator};

/// The Identity service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    auth: Arc<dyn Authenticator>,
}

impl IdentityService {
    /// A service authenticating callers with `auth`.
    pub fn new(auth: Arc<dyn Authenticator>) -> Self {
        Self { auth }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let token = auth::bearer(request.metadata())?;
        self.auth.authenticate(token).await?;
        Err(Status::unimplemented(
            "certificate signing is not implemented by this control plane yet",
        ))
    }
}
