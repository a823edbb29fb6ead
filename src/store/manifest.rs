//! A rank's manifest in the shared region: the names of its saved byte ranges (tensors by
//! name, keys per allocation or per range), so a restarted process restores bytes by identity,
//! never by order.
//!
//! Encoded as little-endian fields with a checksum ([`crate::checksum`]) over everything before
//! it, and the instance name, rank and world it was written for. Decoding trusts nothing: every
//! length is bounded by the buffer, every string must be UTF-8, names must be unique, and a
//! manifest of another instance, rank or world is refused.

use std::collections::HashSet;
use std::sync::Arc;

use super::shared::{NamedRange, SLOTS};
use crate::error::{bail, Result};

const MAGIC: [u8; 8] = *b"DEVMEMMF";
const VERSION: u32 = 1;
/// Longest name of a range, in bytes.
pub(crate) const MAX_NAME: usize = 4096;

/// Whose manifest it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The instance name.
    pub name: String,
    /// The rank.
    pub rank: u32,
    /// The world size.
    pub world: u32,
}

fn checksum(body: &[u8]) -> u64 {
    let mut padded = body.to_vec();
    padded.resize(body.len().next_multiple_of(8), 0);
    crate::checksum::of(&padded) ^ body.len() as u64
}

/// The bytes of a manifest of `ranges` for `who`.
pub fn encode(who: &Identity, ranges: &[NamedRange]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + ranges.len() * 96);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&who.rank.to_le_bytes());
    out.extend_from_slice(&who.world.to_le_bytes());
    put_str(&mut out, &who.name);
    out.extend_from_slice(&(ranges.len() as u64).to_le_bytes());
    for r in ranges {
        out.extend_from_slice(&(r.slot as u32).to_le_bytes());
        out.extend_from_slice(&r.serial.to_le_bytes());
        out.extend_from_slice(&r.offset.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
        out.push(u8::from(r.checksum.is_some()));
        out.extend_from_slice(&r.checksum.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&r.tail.to_le_bytes());
        put_str(&mut out, &r.tag);
        put_str(&mut out, &r.name);
    }
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let Some(end) = end else {
            bail!(Region, "manifest: truncated at byte {}", self.at);
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self, limit: usize, what: &str) -> Result<Arc<str>> {
        let n = self.u32()? as usize;
        if n == 0 || n > limit {
            bail!(
                Region,
                "manifest: a {what} of {n} bytes (1 to {limit} allowed)"
            );
        }
        match std::str::from_utf8(self.take(n)?) {
            Ok(s) => Ok(Arc::from(s)),
            Err(_) => bail!(Region, "manifest: a {what} that is not UTF-8"),
        }
    }
}

/// The ranges of a manifest written for `who`; an error for anything else.
pub fn decode(bytes: &[u8], who: &Identity) -> Result<Vec<NamedRange>> {
    if bytes.len() < 8 + MAGIC.len() {
        bail!(Region, "manifest: {} bytes is too short", bytes.len());
    }
    let (body, tail) = bytes.split_at(bytes.len() - 8);
    let mut sum = [0u8; 8];
    sum.copy_from_slice(tail);
    if checksum(body) != u64::from_le_bytes(sum) {
        bail!(Region, "manifest: checksum mismatch (changed or torn)");
    }
    let mut r = Reader { bytes: body, at: 0 };
    if r.array::<8>()? != MAGIC {
        bail!(Region, "manifest: bad magic");
    }
    let version = r.u32()?;
    if version != VERSION {
        bail!(
            Region,
            "manifest: version {version}; this devmem reads {VERSION}"
        );
    }
    let (rank, world) = (r.u32()?, r.u32()?);
    let name = r.string(super::shared::MAX_NAME_LEN, "instance name")?;
    if *name != *who.name || rank != who.rank || world != who.world {
        bail!(
            Region,
            "manifest: written for instance {name:?} rank {rank} of {world}, not {:?} rank {} \
             of {}",
            who.name,
            who.rank,
            who.world
        );
    }
    let count = r.u64()?;
    // Each entry takes at least 54 bytes: a count larger than the buffer allows is corrupt.
    if count > (body.len() / 54) as u64 {
        bail!(
            Region,
            "manifest: {count} entries cannot fit in {} bytes",
            body.len()
        );
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut seen = HashSet::new();
    for _ in 0..count {
        let slot = r.u32()? as usize;
        let serial = r.u64()?;
        let offset = r.u64()?;
        let len = r.u64()?;
        let has_sum = r.array::<1>()?[0];
        let sum = r.u64()?;
        let tail = r.u64()?;
        let tag = r.string(crate::core::DEVMEM_MAX_TAG_LEN, "tag")?;
        let name = r.string(MAX_NAME, "name")?;
        let tail_fits = tail >> (8 * (len % 8)) == 0;
        if slot >= SLOTS
            || len == 0
            || offset.checked_add(len).is_none()
            || has_sum > 1
            || !tail_fits
        {
            bail!(Region, "manifest: entry {name:?} is corrupt");
        }
        if !seen.insert(Arc::clone(&name)) {
            bail!(Region, "manifest: name {name:?} appears twice");
        }
        out.push(NamedRange {
            name,
            tag,
            slot,
            serial,
            offset,
            len,
            checksum: (has_sum == 1).then_some(sum),
            tail,
        });
    }
    if r.at != body.len() {
        bail!(
            Region,
            "manifest: {} bytes after the last entry",
            body.len() - r.at
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Identity {
        Identity {
            name: "inst".into(),
            rank: 1,
            world: 2,
        }
    }

    fn range(name: &str) -> NamedRange {
        NamedRange {
            name: Arc::from(name),
            tag: Arc::from("weights"),
            slot: 3,
            serial: 7,
            offset: 512,
            len: 1000,
            checksum: Some(42),
            tail: 0,
        }
    }

    #[test]
    fn round_trips() {
        let ranges = vec![range("a.weight"), range("b.bias")];
        assert_eq!(decode(&encode(&who(), &ranges), &who()).unwrap(), ranges);
    }

    #[test]
    fn refuses_another_identity_or_any_changed_byte() {
        let bytes = encode(&who(), &[range("a")]);
        for other in [
            Identity { rank: 0, ..who() },
            Identity { world: 3, ..who() },
            Identity {
                name: "other".into(),
                ..who()
            },
        ] {
            assert!(decode(&bytes, &other).is_err());
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(
                decode(&bad, &who()).is_err(),
                "byte {i} changed and accepted"
            );
        }
        assert!(decode(&bytes[..bytes.len() - 1], &who()).is_err());
    }

    #[test]
    fn refuses_duplicate_names() {
        let bytes = encode(&who(), &[range("a"), range("a")]);
        assert!(decode(&bytes, &who()).is_err());
    }
}
