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

use crate::{Error, Identity, Result};

/// The suffix of every identity server name.
pub const SUFFIX: &str = ".id.nodeproxy";

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const MAX_LABEL: usize = 63;
const MAX_NAME: usize = 253;

/// The server name that names `identity`.
pub fn encode(identity: &Identity) -> Result<String> {
    let b32 = base32(identity.to_string().as_bytes());
    let labels: Vec<&str> = b32
        .as_bytes()
        .chunks(MAX_LABEL)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    let name = format!("{}{SUFFIX}", labels.join("."));
    if name.len() > MAX_NAME {
        return Err(Error::SniTooLong {
            identity: identity.to_string(),
            len: name.len(),
        });
    }
    Ok(name)
}

/// The identity a server name produced by [`encode`] names.
pub fn decode(name: &str) -> Result<Identity> {
    let bad = |reason: &'static str| Error::InvalidSni {
        name: name.to_owned(),
        reason,
    };
    let body = name
        .strip_suffix(SUFFIX)
        .ok_or_else(|| bad("it does not end in .id.nodeproxy"))?;
    let b32: String = body.split('.').collect();
    let bytes = unbase32(&b32).ok_or_else(|| bad("it is not base32"))?;
    let text = String::from_utf8(bytes).map_err(|_| bad("it does not decode to text"))?;
    text.parse()
}

fn base32(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(5) * 8);
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in input {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buf >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buf << (5 - bits)) & 31) as usize]));
    }
    out
}

fn unbase32(input: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() * 5 / 8);
    let (mut buf, mut bits) = (0u32, 0u32);
    for c in input.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push(((buf >> bits) & 0xff) as u8);
        }
    }
    Some(out)
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
    fn rejects_foreign_names() {
        assert!(decode("example.com").is_err());
        assert!(decode("1!.id.nodeproxy").is_err());
        let long = Identity::new("cluster.local", &"n".repeat(100), &"s".repeat(100)).unwrap();
        assert!(encode(&long).unwrap_err().to_string().contains("too long"));
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
