//! Errors of the control plane's sources and translation.
//!
//! Owns [`Error`], [`Problem`] and [`Origin`]. A configuration is checked as a whole: every
//! problem found in a file (or, later, in a set of API objects) is collected into one
//! [`Error::Config`] so the operator fixes them in one pass instead of one per run.
//!
//! Must not touch: sockets, files, the environment. It only describes what went wrong.

use std::fmt;
use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// Why reading it failed.
        #[source]
        source: std::io::Error,
    },
    /// The YAML itself is malformed; the message carries the parser's line and column.
    #[error("{file}: yaml {source}")]
    Yaml {
        /// The file (or other source name) being parsed.
        file: String,
        /// The parser's error, with its location (boxed: it is large).
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// The objects are well-formed YAML but describe an unusable configuration. Every problem
    /// found is listed, one per line.
    #[error("{}", ProblemList { file, problems })]
    Config {
        /// The file (or other source name) the objects came from.
        file: String,
        /// Everything that is wrong, in document order.
        problems: Vec<Problem>,
    },
    /// The control plane sent a value that does not parse.
    #[error(
        "the control plane sent an invalid {field} {value:?}; run a control plane and nodes of \
         matching versions"
    )]
    Wire {
        /// What the value was.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// A control plane endpoint is not a usable URL.
    #[error("invalid control plane address {endpoint:?}: {reason}; use http://host:port")]
    Endpoint {
        /// The address as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A token file could not be used.
    #[error("token file {}: {reason}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, and the fix.
        reason: String,
    },
    /// A listener or connection failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The configured trust domain cannot be part of a SPIFFE ID.
    #[error("invalid trust domain {trust_domain:?}: {source}")]
    TrustDomain {
        /// The offending trust domain.
        trust_domain: String,
        /// What is wrong with it.
        #[source]
        source: certs::Error,
    },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where an object was defined in a YAML stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    /// The document number, 1-based, counting `---` separators (empty documents count).
    pub document: usize,
    /// The line the document's content starts on, 1-based, when the parser reported it.
    pub line: Option<u64>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        Ok(())
    }
}

/// One thing wrong with a configuration: where, which object, which field, and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The document the object came from, when it came from a file.
    pub origin: Option<Origin>,
    /// The object, as `Kind namespace/name` (e.g. `Pod shop/web-1`), when known.
    pub object: Option<String>,
    /// The field path inside the object (e.g. `status.podIP`), when known.
    pub field: Option<String>,
    /// What is wrong and how to fix it; lowercase.
    pub message: String,
}

impl Problem {
    /// A problem with only a message; use the builder methods to say where it is.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            origin: None,
            object: None,
            field: None,
            message: message.into(),
        }
    }

    /// Sets the document the problem was found in.
    #[must_use]
    pub fn at(mut self, origin: Option<Origin>) -> Self {
        self.origin = origin;
        self
    }

    /// Sets the object the problem is about.
    #[must_use]
    pub fn object(mut self, object: impl Into<String>) -> Self {
        self.object = Some(object.into());
        self
    }

    /// Sets the field the problem is about; an empty path (the whole object) sets none.
    #[must_use]
    pub fn field(mut self, field: impl Into<String>) -> Self {
        let field = field.into();
        self.field = (!field.is_empty()).then_some(field);
        self
    }
}

impl fmt::Display for Problem {
    /// `document 3, line 12 (Pod shop/web-1): status.podIP: missing; ...`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.origin, &self.object) {
            (Some(origin), Some(object)) => write!(f, "{origin} ({object}): ")?,
            (Some(origin), None) => write!(f, "{origin}: ")?,
            (None, Some(object)) => write!(f, "{object}: ")?,
            (None, None) => {}
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Renders problems one per line, each prefixed with the file name.
struct ProblemList<'a> {
    file: &'a str,
    problems: &'a [Problem],
}

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if !self.file.is_empty() {
                write!(f, "{}: ", self.file)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// Sorts problems into document order (problems without a document last), keeping the order
/// in which they were found within one document.
pub(crate) fn sort_problems(problems: &mut [Problem]) {
    problems.sort_by_key(|p| p.origin.map_or(usize::MAX, |o| o.document));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_one_problem_per_line_with_file_document_object_and_field() {
        let err = Error::Config {
            file: "examples/bad.yaml".into(),
            problems: vec![
                Problem::new("missing; set status.podIP")
                    .at(Some(Origin {
                        document: 3,
                        line: Some(20),
                    }))
                    .object("Pod shop/web-1")
                    .field("status.podIP"),
                Problem::new("something global"),
            ],
        };
        assert_eq!(
            err.to_string(),
            "examples/bad.yaml: document 3, line 20 (Pod shop/web-1): status.podIP: missing; set status.podIP\n\
             examples/bad.yaml: something global"
        );
    }
}
