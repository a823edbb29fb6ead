//! The block allocator: host chunks cut into fixed-size blocks, handed out as runs of blocks.
//!
//! A plain data structure with no globals, no locks and no I/O: the store wraps it in its lock
//! and feeds it chunks from a host-memory source.

use std::collections::BTreeMap;

/// Backups are made of blocks of this size (the device granularity on current GPUs).
pub(crate) const BLOCK: usize = 2 << 20;

/// A run of blocks inside one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// The chunk's id in its [`BlockMap`].
    pub chunk: u64,
    /// Index of the first block inside the chunk.
    pub first_block: usize,
    /// Blocks in the run.
    pub blocks: usize,
    /// Host address of the first block.
    pub ptr: usize,
}

impl Extent {
    /// Bytes covered by the extent.
    pub fn len(&self) -> usize {
        self.blocks * BLOCK
    }
}

/// One chunk of host memory and which of its blocks are in use.
#[derive(Debug)]
pub struct Chunk {
    /// Host address of the chunk.
    pub ptr: usize,
    /// Length in bytes (a multiple of [`BLOCK`]).
    pub len: usize,
    used: Vec<bool>,
    used_blocks: usize,
}

impl Chunk {
    fn blocks(&self) -> usize {
        self.used.len()
    }

    fn free_blocks(&self) -> usize {
        self.blocks() - self.used_blocks
    }

    /// The first run of free blocks at or after `from` at least `min` long, capped at `max`.
    fn run_from(&self, from: usize, min: usize, max: usize) -> Option<(usize, usize)> {
        if self.free_blocks() < min {
            return None;
        }
        let mut i = from;
        while i < self.used.len() {
            if self.used[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < self.used.len() && !self.used[i] && i - start < max {
                i += 1;
            }
            if i - start >= min {
                return Some((start, i - start));
            }
        }
        None
    }
}

/// Chunks and their blocks. Every count is kept exact: a caller that hands back an extent it
/// never took, or twice, gets an error instead of a wrapped counter.
#[derive(Debug, Default)]
pub struct BlockMap {
    chunks: BTreeMap<u64, Chunk>,
    next_id: u64,
    held_blocks: usize,
    used_blocks: usize,
}

/// An extent handed back that the map does not hold as used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotTaken(pub Extent);

impl BlockMap {
    /// Blocks in every chunk.
    pub fn held_blocks(&self) -> usize {
        self.held_blocks
    }

    /// Blocks in backups.
    #[cfg(test)]
    pub fn used_blocks(&self) -> usize {
        self.used_blocks
    }

    /// Blocks not in any backup.
    pub fn free_blocks(&self) -> usize {
        self.held_blocks - self.used_blocks
    }

    /// Number of chunks.
    #[cfg(test)]
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Adds a chunk of `len` bytes (rounded down to whole blocks) at `ptr`; returns its id.
    pub fn add(&mut self, ptr: usize, len: usize) -> u64 {
        let blocks = len / BLOCK;
        self.next_id += 1;
        let id = self.next_id;
        self.chunks.insert(
            id,
            Chunk {
                ptr,
                len,
                used: vec![false; blocks],
                used_blocks: 0,
            },
        );
        self.held_blocks += blocks;
        id
    }

    /// Takes `need` blocks: one run when a chunk has one, else runs from several chunks, in
    /// address order of the bytes they will hold. `None` (and nothing taken) when the free
    /// blocks are not enough.
    pub fn take(&mut self, need: usize) -> Option<Vec<Extent>> {
        if need == 0 || need > self.free_blocks() {
            return None;
        }
        let mut runs: Vec<(u64, usize, usize)> = Vec::new();
        if let Some(run) = self
            .chunks
            .iter()
            .find_map(|(id, c)| c.run_from(0, need, need).map(|(at, n)| (*id, at, n)))
        {
            runs.push(run);
        } else {
            let mut left = need;
            for (id, chunk) in &self.chunks {
                let mut from = 0;
                while left > 0 {
                    let Some((at, n)) = chunk.run_from(from, 1, left) else {
                        break;
                    };
                    runs.push((*id, at, n));
                    left -= n;
                    from = at + n;
                }
                if left == 0 {
                    break;
                }
            }
            if left > 0 {
                return None;
            }
        }
        let mut extents = Vec::with_capacity(runs.len());
        for (id, at, n) in runs {
            // Found in this map a moment ago under the same `&mut self`.
            let Some(chunk) = self.chunks.get_mut(&id) else {
                continue;
            };
            chunk.used[at..at + n].iter_mut().for_each(|b| *b = true);
            chunk.used_blocks += n;
            self.used_blocks += n;
            extents.push(Extent {
                chunk: id,
                first_block: at,
                blocks: n,
                ptr: chunk.ptr + at * BLOCK,
            });
        }
        Some(extents)
    }

    /// Returns extents to the free blocks. An extent that is not held as used is reported and
    /// skipped; the others are returned.
    pub fn put_back(&mut self, extents: &[Extent]) -> Result<(), NotTaken> {
        let mut first_bad = None;
        for e in extents {
            let ok = self.chunks.get_mut(&e.chunk).is_some_and(|chunk| {
                let range = e.first_block..e.first_block + e.blocks;
                let valid =
                    range.end <= chunk.used.len() && chunk.used[range.clone()].iter().all(|b| *b);
                if valid {
                    chunk.used[range].iter_mut().for_each(|b| *b = false);
                    chunk.used_blocks -= e.blocks;
                }
                valid
            });
            if ok {
                self.used_blocks -= e.blocks;
            } else {
                first_bad.get_or_insert(NotTaken(*e));
            }
        }
        first_bad.map_or(Ok(()), Err)
    }

    /// Removes every chunk no backup uses and returns them, for the caller to free.
    pub fn remove_unused(&mut self) -> Vec<Chunk> {
        let ids: Vec<u64> = self
            .chunks
            .iter()
            .filter(|(_, c)| c.used_blocks == 0)
            .map(|(id, _)| *id)
            .collect();
        let removed: Vec<Chunk> = ids.iter().filter_map(|id| self.chunks.remove(id)).collect();
        self.held_blocks -= removed.iter().map(Chunk::blocks).sum::<usize>();
        removed
    }

    /// Puts back a chunk removed by [`remove_unused`](Self::remove_unused) that could not be
    /// freed.
    pub fn restore(&mut self, chunk: Chunk) {
        self.held_blocks += chunk.blocks();
        self.used_blocks += chunk.used_blocks;
        self.next_id += 1;
        self.chunks.insert(self.next_id, chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_with(chunks: &[usize]) -> BlockMap {
        let mut map = BlockMap::default();
        for (i, blocks) in chunks.iter().enumerate() {
            map.add((i + 1) << 40, blocks * BLOCK);
        }
        map
    }

    #[test]
    fn one_run_when_a_chunk_has_room() {
        let mut map = map_with(&[4, 8]);
        let e = map.take(6).expect("fits in the second chunk");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].blocks, 6);
        assert_eq!(e[0].ptr, 2 << 40);
        assert_eq!(map.free_blocks(), 6);
    }

    #[test]
    fn splits_across_chunks_in_order_and_puts_back_exactly() {
        let mut map = map_with(&[4, 4]);
        let a = map.take(3).expect("3");
        let b = map.take(3).expect("3 more, in the second chunk");
        assert_eq!(b.len(), 1);
        let c = map.take(2).expect("split");
        assert_eq!(c.len(), 2, "one block left in each chunk");
        assert_eq!(c[0].ptr, (1 << 40) + 3 * BLOCK);
        assert_eq!(c[1].ptr, (2 << 40) + 3 * BLOCK);
        assert_eq!(map.free_blocks(), 0);
        assert!(map.take(1).is_none(), "nothing is free");
        map.put_back(&b).expect("taken");
        assert!(map.take(4).is_none(), "three free blocks are not four");
        assert_eq!(map.free_blocks(), 3, "a failed take takes nothing");
        map.put_back(&a).expect("taken");
        map.put_back(&c).expect("taken");
        assert_eq!(map.free_blocks(), 8);
        assert_eq!(map.used_blocks(), 0);
    }

    #[test]
    fn double_put_back_is_refused_without_breaking_counts() {
        let mut map = map_with(&[4]);
        let a = map.take(2).expect("2");
        map.put_back(&a).expect("first");
        assert_eq!(map.put_back(&a), Err(NotTaken(a[0])));
        assert_eq!(map.used_blocks(), 0);
        assert_eq!(map.free_blocks(), 4);
    }

    #[test]
    fn remove_unused_keeps_chunks_in_use() {
        let mut map = map_with(&[2, 2, 2]);
        let a = map.take(2).expect("2");
        let removed = map.remove_unused();
        assert_eq!(removed.len(), 2);
        assert_eq!(map.held_blocks(), 2);
        assert_eq!(map.chunks(), 1);
        let chunk = removed.into_iter().next().expect("one");
        map.restore(chunk);
        assert_eq!(map.held_blocks(), 4);
        map.put_back(&a).expect("taken");
        assert_eq!(map.free_blocks(), 4);
    }

    #[test]
    fn zero_and_oversized_requests_take_nothing() {
        let mut map = map_with(&[2]);
        assert!(map.take(0).is_none());
        assert!(map.take(3).is_none());
        assert!(map.take(usize::MAX).is_none());
        assert_eq!(map.free_blocks(), 2);
    }
}
