#!/usr/bin/env python3
"""Mutation check of the HIP layer's guards (issue 14): applies each mutation to the working tree
in place (restoring the file afterwards), runs the test that guards it and prints its summary: every
line must say "0 passed, 1 failed". Usage: python3 scripts/mutations-hip.py [M30 M31 ...]
"""
import subprocess, sys, shutil
M = [
 ("M30 no re-reserve cycle", "src/backend/layer.rs", "if let (true, None, Some(va)) = (self.cycle, set.mapped_at, set.was_at) {", "if let (true, None, Some(va)) = (false, set.mapped_at, set.was_at) {", "rereserve_returns_device_memory_at_the_same_addresses"),
 ("M31 no recovery of a lost range", "src/backend/layer.rs", "        let lost = self.state.lock().lost.get(&va).copied();", "        let lost: Option<(i32, usize)> = None;", "a_lost_range_is_reserved_again_by_the_wake_or_the_wake_fails_cleanly"),
 ("M32 lost ranges handed out", "src/backend/layer.rs", "match self.claim_lost(va, size) {", "match None::<bool> {", "a_lost_range_is_never_given_to_another_allocation"),
 ("M33 no zero fill", "src/store/pipeline.rs", "let zero_discarded = crate::backend::settings().zero_on_wake;", "let zero_discarded = false;", "zero_on_wake_clears_discarded_allocations"),
 ("M34 device not given back", "src/backend/hip.rs", "        if previous != device {\n            if let Err(err) = self.api.set_device(previous) {", "        if false {\n            if let Err(err) = self.api.set_device(previous) {", "the_threads_current_device_is_given_back"),
 ("M35 chunks released by a failed release not recreated", "src/backend/layer.rs", "        let missing: Vec<usize> = (0..pieces.len()).filter(|&i| pieces[i].0 == 0).collect();", "        let missing: Vec<usize> = Vec::new();", "a_release_failing_midway_keeps_the_rest_and_the_wake_completes_the_set"),
 ("M36 no remap after a failed unmap", "src/backend/layer.rs", "            self.remap(device, va, &sizes, &was, &mut mapped);", "", "an_unmap_failing_midway_maps_the_chunks_back"),
 ("M37 no chunking", "src/backend/layer.rs", "        if self.chunk == 0 || size == 0 || size < self.min_chunked {", "        if true {", "chunked_allocations_keep_their_bytes_and_list_their_chunks"),
 ("M38 created chunks not undone", "src/backend/layer.rs", "                    for &(handle, _) in pieces.iter().rev() {", "                    for &(handle, _) in pieces.iter().take(0) {", "a_failed_chunk_releases_the_chunks_before_it"),
 ("M39 reservations not serialised with the cycle", "src/backend/layer.rs", "    fn cycle_range(&self, device: i32, va: u64, size: usize) {\n        let _reserving = self.reserving.lock();", "    fn cycle_range(&self, device: i32, va: u64, size: usize) {", "threads_follow_their_models"),
]
only = sys.argv[1:]
for name, path, old, new, test in M:
    if only and name.split()[0] not in only: continue
    src = open(path).read()
    assert old in src, name
    open(path, "w").write(src.replace(old, new, 1))
    try:
        binary = "model" if test == "threads_follow_their_models" else "hip"
        env = "DEVMEM_TEST_BACKEND=hip " if binary == "model" else ""
        r = subprocess.run(f"{env}cargo nextest run -j 2 --test {binary} -E 'test(={test})' 2>&1 | grep -E 'Summary'", shell=True, capture_output=True, text=True)
        print(name, "->", r.stdout.strip())
    finally:
        open(path, "w").write(src)
