//! Asynchrony: work queued on a stream (or a Level Zero immediate command list) runs only when
//! someone synchronises with it, as on a GPU where the copy engine is still busy when the call
//! that queued the copy returns.
//!
//! * Queued copies and test "kernels" ([`Work`]) wait in [`Emu::pending`] in queue order.
//! * They run at synchronisation points: `cuCtxSynchronize` (every stream of the current
//!   device), `cuStreamSynchronize` (one stream), `cuEventSynchronize` /
//!   `zeEventHostSynchronize` (one stream, up to the point the event was recorded), and the
//!   synchronous copies (the legacy stream first).
//! * Unmapping or freeing device memory, freeing an address range, or unregistering / freeing
//!   host memory while queued work still touches it is a **violation**: it is recorded (with a
//!   description) and the work is dropped, as its memory is gone. A queued copy whose host
//!   range overlaps work pending on another stream is a violation too (host memory reused
//!   before the work on it finished). Tests assert that no violation was recorded.

use crate::*;

/// A stream: (device, stream or command-list handle). The legacy stream is handle 0.
pub(crate) type StreamKey = (i32, usize);

/// What queued work does when it runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Work {
    /// `len` bytes from `src` to `dst` (either may be device memory).
    Copy { dst: u64, src: u64, len: usize },
    /// A kernel writing `byte` over `len` bytes of device memory at `dst`.
    Fill { dst: u64, len: usize, byte: u8 },
    /// devmem's checksum kernel: the checksum of `len` bytes at `src` into the first of the
    /// `CHECKSUM_PARTIALS` 8-byte partial sums at `partials`, zeros into the rest.
    Checksum { src: u64, len: usize, partials: u64 },
}

/// Partial sums the checksum kernel writes (one per block of devmem's launch).
pub(crate) const CHECKSUM_PARTIALS: usize = 1024;

impl Work {
    /// The address ranges the work reads or writes.
    fn ranges(&self) -> [(u64, usize); 2] {
        match *self {
            Work::Copy { dst, src, len } => [(dst, len), (src, len)],
            Work::Fill { dst, len, .. } => [(dst, len), (dst, 0)],
            Work::Checksum { src, len, partials } => {
                [(src, len), (partials, CHECKSUM_PARTIALS * 8)]
            }
        }
    }

    fn touches(&self, start: u64, len: usize) -> bool {
        self.ranges()
            .iter()
            .any(|(p, n)| *n > 0 && *p < start + len as u64 && start < p + *n as u64)
    }
}

/// One piece of queued work.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) stream: StreamKey,
    pub(crate) seq: u64,
    pub(crate) work: Work,
}

impl Emu {
    /// Queues `work` on `stream`; device ranges must be mapped with access now.
    pub(crate) fn enqueue(&mut self, stream: StreamKey, work: Work) -> R {
        for (p, n) in work.ranges() {
            if n > 0 && self.is_device_range(p, n) && !self.accessible(p, n) {
                return INVALID_VALUE;
            }
            if p == 0 && n > 0 {
                return INVALID_VALUE;
            }
        }
        if let Work::Copy { dst, src, len } = work {
            for host in [dst, src] {
                if self.is_device_range(host, len) {
                    continue;
                }
                let clash = self
                    .pending
                    .iter()
                    .find(|q| q.stream != stream && q.work.touches(host, len))
                    .map(|q| q.stream);
                if let Some(other) = clash {
                    self.violation(format!(
                        "a copy on stream {stream:?} uses host memory {host:#x}+{len} while work \
                         on stream {other:?} still uses it"
                    ));
                }
            }
        }
        if let Work::Copy { dst, len, .. } = work {
            if self.is_device_range(dst, len) {
                self.log_event(EVENT_COPY_QUEUED, dst, len);
            }
        }
        self.next_seq += 1;
        self.pending.push(Pending {
            stream,
            seq: self.next_seq,
            work,
        });
        SUCCESS
    }

    /// The sequence number of the last work queued on `stream` (0 when none is pending).
    pub(crate) fn last_seq(&self, stream: StreamKey) -> u64 {
        self.pending
            .iter()
            .rev()
            .find(|q| q.stream == stream)
            .map_or(0, |q| q.seq)
    }

    /// Records `event` after the work queued on `stream` so far.
    pub(crate) fn record_event(&mut self, event: usize, stream: StreamKey) {
        let seq = self.last_seq(stream);
        self.recorded.insert(event, (stream, seq));
    }

    /// Runs the work queued before `event` was recorded (nothing when it never was).
    pub(crate) fn synchronize_event(&mut self, event: usize) {
        if let Some((stream, seq)) = self.recorded.get(&event).copied() {
            self.complete_stream(stream, seq);
        }
    }

    /// Runs, in queue order, the pending work that `select` picks.
    pub(crate) fn complete(&mut self, select: impl Fn(&Pending) -> bool) {
        let (run, keep): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|q| select(q));
        self.pending = keep;
        for q in run {
            self.run(&q);
        }
    }

    /// Runs every pending piece of work on `device`.
    pub(crate) fn complete_device(&mut self, device: i32) {
        self.complete(|q| q.stream.0 == device);
    }

    /// Runs the pending work of `stream` up to and including `seq`.
    pub(crate) fn complete_stream(&mut self, stream: StreamKey, seq: u64) {
        self.complete(|q| q.stream == stream && q.seq <= seq);
    }

    fn run(&mut self, q: &Pending) {
        for (p, n) in q.work.ranges() {
            if n > 0 && self.is_device_range(p, n) && !self.accessible(p, n) {
                self.violation(format!(
                    "{:?} queued on stream {:?} ran after its device memory at {p:#x} was unmapped",
                    q.work, q.stream
                ));
                return;
            }
        }
        match q.work {
            // SAFETY: device ranges were checked to be accessible mappings just above; host
            // ranges belong to the caller, and freeing them with work pending drops the work.
            Work::Copy { dst, src, len } => {
                // SAFETY: as above.
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
                if self.is_device_range(dst, len) {
                    self.log_event(EVENT_COPY_DONE, dst, len);
                }
            }
            // SAFETY: as above.
            Work::Fill { dst, len, byte } => unsafe {
                std::ptr::write_bytes(dst as *mut u8, byte, len)
            },
            // SAFETY: as above; the partials range was checked like every device range.
            Work::Checksum { src, len, partials } => unsafe {
                let bytes = std::slice::from_raw_parts(src as *const u8, len);
                let out = std::slice::from_raw_parts_mut(partials as *mut u64, CHECKSUM_PARTIALS);
                out.fill(0);
                out[0] = crate::checksum::of(bytes);
            },
        }
    }

    /// Records a violation when pending work touches `[start, start+len)`, which is about to
    /// go away (`what` says how), and drops that work.
    pub(crate) fn check_release(&mut self, start: u64, len: usize, what: &str) {
        let (hit, keep): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|q| q.work.touches(start, len));
        self.pending = keep;
        for q in hit {
            self.violation(format!(
                "{what} {start:#x}+{len} while {:?} queued on stream {:?} had not run",
                q.work, q.stream
            ));
        }
    }

    /// Records a violation. With `DEVMEM_EMU_STRICT=1` the process stops at once (the test
    /// harness reports the crash with the description printed just before).
    pub(crate) fn violation(&mut self, text: String) {
        eprintln!("cuemu: synchronisation violation: {text}");
        if std::env::var("DEVMEM_EMU_STRICT").as_deref() == Ok("1") {
            eprintln!("cuemu: DEVMEM_EMU_STRICT=1: stopping the process");
            std::process::abort();
        }
        self.violations.push(text);
    }
}
