//! The bearer token a client of the control plane sends.
//!
//! Owns [`Token`]: where the token comes from (fixed, a file re-read at every call, none) and
//! how it becomes the `authorization` header. Whether it may cross plain text is
//! [`Target::check`](super::Target::check)'s decision, not this module's.
//!
//! Must not touch: connections, TLS, the Watch loop.

use std::path::PathBuf;

use super::ClientError;

/// Where the token comes from.
#[derive(Clone, Debug)]
pub enum Token {
    /// Fixed (the embedded server's own token).
    Fixed(String),
    /// Read from a file on every connect (bootstrap token, projected service-account token).
    File(PathBuf),
    /// None (the server will refuse; useful in tests).
    None,
}

impl Token {
    /// Reads the token (a file at every call) and sets `authorization: Bearer <token>` on
    /// `request`; with [`Token::None`] nothing.
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) -> Result<(), ClientError> {
        let (token, from) = match self {
            Token::None => return Ok(()),
            Token::Fixed(token) => (token.clone(), "the given token".to_owned()),
            Token::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ClientError::Token {
                    from: format!("file {}", path.display()),
                    reason: format!("cannot read it ({e}); check --control-plane-token-file"),
                })?;
                (text.trim().to_owned(), format!("file {}", path.display()))
            }
        };
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Token {
                from,
                reason: "it is not valid header text (one line of printable ASCII)".to_owned(),
            })?;
        request.metadata_mut().insert("authorization", value);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_sent_as_a_bearer_header_read_from_its_file_at_each_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let header = |token: &Token| {
            let mut request = tonic::Request::new(());
            token.authorize(&mut request).map(|()| {
                request
                    .metadata()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned())
            })
        };
        let file = Token::File(path.clone());
        let err = header(&file).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("cannot read"),
            "{err}"
        );
        std::fs::write(&path, "abc\n").unwrap();
        assert_eq!(header(&file).unwrap().as_deref(), Some("Bearer abc"));
        std::fs::write(&path, "rotated").unwrap();
        assert_eq!(header(&file).unwrap().as_deref(), Some("Bearer rotated"));
        assert_eq!(header(&Token::None).unwrap(), None);
        let err = header(&Token::Fixed("a\nb".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid header text"), "{err}");
    }
}
