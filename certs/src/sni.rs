//! The TLS server name that names a destination identity on the mesh tunnel.
//!
//! SPIFFE IDs are URIs and cannot be server names, so the tunnel client sends a DNS-safe
//! encoding and the server (and our client verifier) decode it:
//!
//! `<base32 of the SPIFFE ID, lowercase, no padding, cut into labels of at most 63>.id.nodeproxy`
//!
//! e.g. `spiffe://cluster.local/ns/a/sa/b` → `on2gszlgmz4tuly…<…>.id.nodeproxy`. Base32 (RFC
//! 4648 alphabet `a-z2-7`) is used because every identity component may contain `.` and `-`,
//! so no readable escaping is unambiguous. A name longer than 253 characters (a SPIFFE ID of
//! more than about 140 characters) cannot be encoded and is an error.
//!
//! Must not touch: anything but strings.

use std::sync::LazyLock;

use data_encoding::{DecodeKind, Encoding, Specification};

use crate::{Error, Identity, Result};

/// The suffix of every identity server name.
pub const SUFFIX: &str = ".id.nodeproxy";

const MAX_LABEL: usize = 63;
const MAX_NAME: usize = 253;

/// RFC 4648 base32 in lowercase, without padding, checking trailing bits: exactly one
/// spelling decodes to a given byte string.
static BASE32: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.check_trailing_bits = true;
    spec.encoding()
        .expect("invariant: a constant 32-symbol ASCII alphabet is a valid specification")
});

/// The server name that names `identity`.
pub fn encode(identity: &Identity) -> Result<String> {
    let b32 = BASE32.encode(identity.to_string().as_bytes());
    let labels = b32.len().div_ceil(MAX_LABEL);
    let mut name = String::with_capacity(b32.len() + labels.saturating_sub(1) + SUFFIX.len());
    for (i, c) in b32.chars().enumerate() {
        if i > 0 && i % MAX_LABEL == 0 {
            name.push('.');
        }
        name.push(c);
    }
    name.push_str(SUFFIX);
    if name.len() > MAX_NAME {
        return Err(Error::SniTooLong {
            identity: identity.to_string(),
            len: name.len(),
        });
    }
    Ok(name)
}

/// The identity a server name produced by [`encode`] names. Only the exact spelling
/// [`encode`] produces is accepted: no uppercase, padding, other label splits or
/// non-zero trailing bits, so each identity has one name.
pub fn decode(name: &str) -> Result<Identity> {
    let bad = |reason: String| Error::InvalidSni {
        name: name.to_owned(),
        reason,
    };
    let body = name
        .strip_suffix(SUFFIX)
        .ok_or_else(|| bad("it does not end in .id.nodeproxy".into()))?;
    let b32: String = body.split('.').collect();
    let bytes = BASE32.decode(b32.as_bytes()).map_err(|e| {
        bad(match e.kind {
            DecodeKind::Symbol => {
                "its labels are not lowercase base32 (only a-z and 2-7, no padding)".into()
            }
            DecodeKind::Trailing => "its base32 has non-zero trailing bits".into(),
            DecodeKind::Length | DecodeKind::Padding => {
                "its base32 has a length no byte string encodes to".into()
            }
        })
    })?;
    let text = String::from_utf8(bytes).map_err(|_| bad("it does not decode to text".into()))?;
    let identity: Identity = text
        .parse()
        .map_err(|e| bad(format!("it does not decode to an identity: {e}")))?;
    // Whatever decoding let through (empty labels, labels cut elsewhere), the name must be
    // the one spelling `encode` gives.
    let canonical = encode(&identity)?;
    if canonical != name {
        return Err(bad(format!(
            "it is not the canonical spelling of {identity}, which is {canonical}"
        )));
    }
    Ok(identity)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_a_valid_server_name() {
        for (ns, sa) in [("a", "b"), ("shop", "web"), ("kube-system", "x.y-z")] {
            let id = Identity::new("cluster.local", ns, sa).unwrap();
            let name = encode(&id).unwrap();
            assert!(name.ends_with(SUFFIX), "{name}");
            assert!(name.split('.').all(|l| !l.is_empty() && l.len() <= 63));
            rustls_pki_types::ServerName::try_from(name.clone()).unwrap();
            assert_eq!(decode(&name).unwrap(), id);
        }
    }

    #[test]
    fn refuses_identities_too_long_for_a_server_name() {
        let long = Identity::new("cluster.local", &"n".repeat(100), &"s".repeat(100)).unwrap();
        let err = encode(&long).unwrap_err().to_string();
        assert!(
            err.contains("too long") && err.contains(&long.to_string()),
            "{err}"
        );
    }

    /// `name` with its base32 body replaced by `f(body)`.
    fn respell(name: &str, f: impl Fn(&str) -> String) -> String {
        format!("{}{SUFFIX}", f(name.strip_suffix(SUFFIX).unwrap()))
    }

    /// `bytes` in base32 with the suffix, in one label whatever its length.
    fn b32_of(bytes: &[u8]) -> String {
        format!("{}{SUFFIX}", BASE32.encode(bytes))
    }

    /// `name`'s body re-cut into labels of `width` characters.
    fn recut(name: &str, width: usize) -> String {
        respell(name, |body| {
            let flat: String = body.split('.').collect();
            let labels: Vec<String> = flat
                .as_bytes()
                .chunks(width)
                .map(|c| String::from_utf8(c.to_vec()).unwrap())
                .collect();
            labels.join(".")
        })
    }

    /// `name` with the last base32 character replaced by `c`.
    fn last_char(name: &str, c: char) -> String {
        respell(name, |body| format!("{}{c}", &body[..body.len() - 1]))
    }

    #[test]
    fn accepts_only_the_one_spelling_encode_produces() {
        // GOLDEN[0] carries 4 trailing bits in its last character ('a' = 0b00000), GOLDEN[1]
        // one ('g' = 0b00110).
        let (one, two) = (GOLDEN[0].1, GOLDEN[1].1);
        let cases: Vec<(String, &str)> = vec![
            // Case variants.
            (respell(one, str::to_uppercase), "not lowercase base32"),
            (
                respell(one, |b| b.replacen('o', "O", 1)),
                "not lowercase base32",
            ),
            (
                one.replace(SUFFIX, ".ID.NODEPROXY"),
                "does not end in .id.nodeproxy",
            ),
            // Padding.
            (respell(one, |b| format!("{b}====")), "not lowercase base32"),
            // Labels cut elsewhere, or empty.
            (recut(one, 30), "not the canonical spelling"),
            (recut(two, 60), "not the canonical spelling"),
            (recut(two, 77), "not the canonical spelling"),
            (
                respell(two, |b| b.replace('.', "..")),
                "not the canonical spelling",
            ),
            (
                respell(one, |b| format!(".{b}")),
                "not the canonical spelling",
            ),
            // Non-zero trailing bits: the same bytes, another last character.
            (last_char(one, 'b'), "non-zero trailing bits"),
            (last_char(one, 'p'), "non-zero trailing bits"),
            (last_char(two, 'h'), "non-zero trailing bits"),
            // Wrong suffix.
            ("example.com".into(), "does not end in .id.nodeproxy"),
            (format!("{one}."), "does not end in .id.nodeproxy"),
            (
                one.replace(SUFFIX, ".id.example"),
                "does not end in .id.nodeproxy",
            ),
            // Not base32.
            ("1!.id.nodeproxy".into(), "not lowercase base32"),
            (last_char(one, '0'), "not lowercase base32"),
            (
                "a.id.nodeproxy".into(),
                "a length no byte string encodes to",
            ),
            // Base32, but not of a workload SPIFFE ID.
            (SUFFIX.into(), "does not decode to an identity"),
            (b32_of(&[0xff, 0xfe]), "does not decode to text"),
            (
                b32_of(b"https://example.com/"),
                "does not decode to an identity",
            ),
            (
                b32_of(b"spiffe://cluster.local/ns/A/sa/b"),
                "does not decode to an identity",
            ),
        ];
        for (name, reason) in cases {
            let err = decode(&name).expect_err(&name);
            assert!(matches!(err, Error::InvalidSni { .. }), "{name}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("{name:?}")), "{name}: {msg}");
            assert!(msg.contains(reason), "{name}: {msg}");
        }
    }

    #[test]
    fn errors_give_the_canonical_spelling_and_the_inner_cause() {
        let (id, name) = GOLDEN[1];
        let err = decode(&recut(name, 60)).unwrap_err().to_string();
        assert!(err.contains(id) && err.contains(name), "{err}");
        let err = decode(&b32_of(b"spiffe://cluster.local/ns/A/sa/b")).unwrap_err();
        assert!(err.to_string().contains("\"A\""), "{err}");
    }

    /// Encodings computed with the hand-written base32 this module had before it used
    /// `data-encoding` (and checked against Python's `base64.b32encode`): names already on
    /// the wire must not change. The three cover one label, a split after 63 characters, and
    /// 4 and 1 trailing bits.
    const GOLDEN: [(&str, &str); 3] = [
        (
            "spiffe://cluster.local/ns/shop/sa/web",
            "onygsztgmu5c6l3dnr2xg5dfoixgy33dmfwc63ttf5zwq33qf5zwcl3xmvra.id.nodeproxy",
        ),
        (
            "spiffe://cluster.local/ns/kube-system/sa/coredns",
            "onygsztgmu5c6l3dnr2xg5dfoixgy33dmfwc63ttf5vxkytffvzxs43umvws643.bf5rw64tfmrxhg.id.nodeproxy",
        ),
        (
            "spiffe://prod.example.com/ns/payments-eu-west-1/sa/ledger-writer.v2",
            "onygsztgmu5c6l3qojxwiltfpbqw24dmmuxgg33nf5xhgl3qmf4w2zloorzs2zl.vfv3wk43ufuys643bf5wgkzdhmvzc253snf2gk4rooyza.id.nodeproxy",
        ),
    ];

    #[test]
    fn encodings_on_the_wire_do_not_change() {
        for (id, name) in GOLDEN {
            let id: Identity = id.parse().unwrap();
            assert_eq!(encode(&id).unwrap(), name, "{id}");
            assert_eq!(decode(name).unwrap(), id, "{name}");
        }
    }
}
