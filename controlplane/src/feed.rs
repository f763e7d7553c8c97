//! The feed between a source and the server: [`Publisher`] translates each new set of objects
//! once (node-independent, [`Cluster`]) and publishes it with a version through a
//! `tokio::sync::watch`; [`watch_file`] is the file source's loop (poll the file's mtime and
//! size every interval, reload on change, keep the last good objects on a bad file).
//!
//! Must not touch: sockets; the Kubernetes source lives in [`crate::kubernetes`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::convert::SharedWire;
use crate::file::FileSource;
use crate::objects::Objects;
use crate::view::{Cluster, Mode};

/// Metric: objects published by the sources (counter).
pub const UPDATES_TOTAL: &str = "nodeproxy_controlplane_source_updates_total";
/// Metric: source loads that failed and kept the last good objects (counter).
pub const SOURCE_ERRORS_TOTAL: &str = "nodeproxy_controlplane_source_errors_total";

/// One translated generation of a source's objects.
#[derive(Debug)]
pub struct Published {
    /// Increases with every publication.
    pub version: u64,
    /// The translation of every object, ready to cut node views from.
    pub cluster: Cluster,
    /// The wire form of what every node's view shares, built once.
    pub shared: Arc<SharedWire>,
    /// When it was published (push latency is measured from here).
    pub at: Instant,
}

/// What the server watches: `None` until the source loaded once.
pub type Feed = watch::Receiver<Option<Arc<Published>>>;

/// The sending side of a [`Feed`].
#[derive(Debug)]
pub struct Publisher {
    tx: watch::Sender<Option<Arc<Published>>>,
    trust_domain: String,
    mode: Mode,
    version: u64,
}

impl Publisher {
    /// A publisher translating with `trust_domain` in `mode`, and its feed.
    pub fn new(trust_domain: &str, mode: Mode) -> (Self, Feed) {
        let (tx, rx) = watch::channel(None);
        let publisher = Self {
            tx,
            trust_domain: trust_domain.to_owned(),
            mode,
            version: 0,
        };
        (publisher, rx)
    }

    /// Translates and publishes `objects`; in lenient mode, logs what was left out.
    pub fn publish(&mut self, objects: &Objects) -> Arc<Published> {
        let cluster = Cluster::translate(objects, &self.trust_domain, self.mode);
        for problem in &cluster.problems {
            tracing::warn!(source = %objects.source, %problem, "skipping an invalid object");
        }
        self.version += 1;
        metrics::counter!(UPDATES_TOTAL).increment(1);
        let shared = Arc::new(SharedWire::from_cluster(&cluster));
        let published = Arc::new(Published {
            version: self.version,
            shared,
            cluster,
            at: Instant::now(),
        });
        self.tx.send_replace(Some(published.clone()));
        published
    }

    /// Another receiver of the feed.
    pub fn subscribe(&self) -> Feed {
        self.tx.subscribe()
    }
}

/// Where the file source reads from.
#[derive(Clone, Debug)]
pub enum FileInput {
    /// A file, watched for changes.
    Path(PathBuf),
    /// Fixed text (the daemon's embedded view), with a name for messages.
    Text {
        /// Names the text in messages.
        name: String,
        /// The YAML stream.
        text: String,
    },
}

/// Runs the file source: loads `input`, publishes it, and (for a path) polls its mtime and size
/// every `interval`, republishing on change. A file that fails to load keeps the last good
/// objects in force (logged and counted). Returns only if the feed has no receivers left.
pub async fn watch_file(input: FileInput, mut publisher: Publisher, interval: Duration) {
    let path = match input {
        FileInput::Text { name, text } => {
            match FileSource::parse_str(&name, &text) {
                Ok(objects) => {
                    publisher.publish(&objects);
                }
                Err(e) => {
                    metrics::counter!(SOURCE_ERRORS_TOTAL).increment(1);
                    tracing::error!(error = %e, "cannot load the embedded objects");
                }
            }
            publisher.tx.closed().await;
            return;
        }
        FileInput::Path(path) => path,
    };
    let mut seen: Option<(SystemTime, u64)> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = publisher.tx.closed() => return,
        }
        let stamp = std::fs::metadata(&path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp.is_some() && stamp == seen {
            continue;
        }
        match FileSource::load(&path) {
            Ok(objects) => {
                seen = stamp;
                let version = publisher.publish(&objects).version;
                tracing::info!(path = %path.display(), version, pods = objects.pods.len(), "file source loaded");
            }
            Err(e) => {
                // Do not retry an unchanged bad file every second; wait for the next change.
                if seen != stamp || stamp.is_none() {
                    metrics::counter!(SOURCE_ERRORS_TOTAL).increment(1);
                    tracing::error!(error = %e, "file source: keeping the last good objects");
                }
                seen = stamp;
            }
        }
    }
}
