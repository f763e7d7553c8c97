//! The feed between a source and the server: [`Publisher`] translates each new set of objects
//! once (node-independent, [`Cluster`]) and publishes it with a version through a
//! `tokio::sync::watch`; [`watch_file`] is the file source's loop (poll the file's mtime and
//! size every interval, reload on change or when [`Rereads::now`] is notified, keep the last
//! good objects on a bad file).
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

/// When the file source re-reads its file: every `every` if the file's mtime or size changed,
/// and at once, changed or not, whenever `now` is notified (the daemon's SIGHUP).
#[derive(Debug, Clone, Default)]
pub struct Rereads {
    /// The polling interval; `None`: never poll.
    pub every: Option<Duration>,
    /// Notified to re-read now.
    pub now: Arc<tokio::sync::Notify>,
}

impl Rereads {
    /// Poll every `interval`.
    pub fn every(interval: Duration) -> Self {
        Self {
            every: Some(interval),
            now: Arc::default(),
        }
    }
}

/// Runs the file source: loads `input`, publishes it, and (for a path) polls its mtime and size
/// every `interval`, republishing on change. A file that fails to load keeps the last good
/// objects in force (logged and counted). Returns only if the feed has no receivers left.
pub async fn watch_file(input: FileInput, publisher: Publisher, interval: Duration) {
    watch_file_on(input, publisher, Rereads::every(interval)).await;
}

/// Like [`watch_file`], re-reading when `rereads` says.
pub async fn watch_file_on(input: FileInput, mut publisher: Publisher, rereads: Rereads) {
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
    let mut ticker = rereads.every.map(|every| {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });
    let mut seen = None;
    load_if_changed(&path, &mut seen, &mut publisher, true);
    loop {
        let tick = async {
            match &mut ticker {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let forced = tokio::select! {
            () = tick => false,
            () = rereads.now.notified() => true,
            () = publisher.tx.closed() => return,
        };
        load_if_changed(&path, &mut seen, &mut publisher, forced);
    }
}

/// Loads and publishes `path` if its mtime or size differ from `seen` (or if `forced`).
fn load_if_changed(
    path: &std::path::Path,
    seen: &mut Option<(SystemTime, u64)>,
    publisher: &mut Publisher,
    forced: bool,
) {
    let stamp = std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())));
    if !forced && stamp.is_some() && stamp == *seen {
        return;
    }
    match FileSource::load(path) {
        Ok(objects) => {
            *seen = stamp;
            let version = publisher.publish(&objects).version;
            tracing::info!(path = %path.display(), version, pods = objects.pods.len(), forced, "file source loaded");
        }
        Err(e) => {
            // Do not report an unchanged bad file at every poll; wait for the next change.
            if forced || *seen != stamp || stamp.is_none() {
                metrics::counter!(SOURCE_ERRORS_TOTAL).increment(1);
                tracing::error!(error = %e, "file source: keeping the last good objects");
            }
            *seen = stamp;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const POD: &str = "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels:\n    nodeproxy.io/mesh: enabled\n";

    /// Waits (with a deadline) for the feed to publish a version above `after`.
    async fn next_version(feed: &mut Feed, after: u64) -> u64 {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(p) = feed.borrow_and_update().clone()
                    && p.version > after
                {
                    return p.version;
                }
                feed.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no version above {after} within 10 s"))
    }

    #[tokio::test]
    async fn without_polling_only_a_notification_rereads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("view.yaml");
        std::fs::write(&path, POD).unwrap();
        let (publisher, mut feed) = Publisher::new("cluster.local", Mode::Strict);
        let rereads = Rereads::default();
        let now = rereads.now.clone();
        let task = tokio::spawn(watch_file_on(
            FileInput::Path(path.clone()),
            publisher,
            rereads,
        ));
        assert_eq!(next_version(&mut feed, 0).await, 1);

        // A change alone is not read (no polling): a notification reads it, and only then.
        let two = format!(
            "{POD}---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: b\n  labels:\n    nodeproxy.io/mesh: enabled\n"
        );
        std::fs::write(&path, two).unwrap();
        now.notify_one();
        assert_eq!(next_version(&mut feed, 1).await, 2);
        let meshed = feed
            .borrow()
            .as_ref()
            .unwrap()
            .cluster
            .meshed_namespaces()
            .len();
        assert_eq!(meshed, 2, "the second read saw the change");
        // A notification re-reads even an unchanged file.
        now.notify_one();
        assert_eq!(next_version(&mut feed, 2).await, 3);
        task.abort();
    }
}
