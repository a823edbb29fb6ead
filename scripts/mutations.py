#!/usr/bin/env python3
"""Mutation check of the synchronisation points and guards (issues 11 and 12): applies each mutation to a
git worktree (default /tmp/mut: git worktree add /tmp/mut HEAD), runs the Rust suites on both
emulator faces and writes the failing tests to <worktree>/results.txt. Usage:
  python3 scripts/mutations.py [/path/to/worktree] [M1 M2 ...]
"""
import os
import re
import subprocess
import sys

root = next((a for a in sys.argv[1:] if a.startswith("/")), "/tmp/mut")
env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(root, "target"))
muts = [
 ("M1 no device wait before sleep", 'src/store/pipeline.rs',
  """    for device in &devices {
        backend.synchronize(*device).map_err(|e| {
            e.context("sleep: waiting for the device before unmapping; nothing was released")
        })?;
    }""", ""),
 ("M2 no batch marker wait", 'src/store/pipeline.rs',
  """        if let Err(err) = backend.wait_copy_marker(batch.device, batch.marker) {
            failure = Some(err.context("sleep: waiting for the copies to host memory"));
            break;
        }""", ""),
 ("M3 no wait for wake's copies", 'src/store/pipeline.rs',
  """            if let Err(err) = backend.wait_copies(*device) {
                failure = Some(err.context("wake: waiting for the copies to the device"));
                break;
            }""", ""),
 ("M4 no device wait in free", 'src/core.rs',
  """        backend.synchronize(device)?;
        backend
            .unmap(device, ptr, size)""", """        backend
            .unmap(device, ptr, size)"""),
 ("M5 no marker/copy wait after a failed sleep", 'src/store/pipeline.rs',
  """    for batch in batches.iter().filter(|b| !b.waited) {
        if let Err(e) = backend.wait_copy_marker(batch.device, batch.marker) {
            log::error!("devmem: waiting for a copy marker after a failure: {e}");
        }
    }
    finish_copies(&**backend, &devices);""", ""),
 ("M6 free without the id check", 'src/core.rs', ".filter(|a| a.id == id)", ""),
 ("M7 no host-memory bound", 'src/store/mod.rs',
  "bound::check(missing as u64 + preparing, held, &bound::Room::read())?;", "let _ = (held, preparing);"),
 ("M8 rollback ignores a failed unmap", 'src/store/pipeline.rs',
  """        return Left::Mapped(handle);""", """        return Left::Undone;"""),
 ("M9 the grower started with std::thread::spawn", 'src/store/mod.rs',
  'if let Err(err) = threads::spawn("devmem-host-store", move || grow(source)) {',
  'if let Err(err) = Ok::<_, std::io::Error>(std::thread::spawn(move || grow(source))) {'),
]
# Issue 12: the shared store's guards; the suites are limited to tests/shared_store.rs (the
# fourth field), which holds every test of the store.
SHARED = ['--test', 'shared_store']
muts = [m + (None,) for m in muts] + [
 ("M10 the region's path is followed through a symlink", 'src/store/shared.rs',
  "let flags = libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW;", "let flags = libc::O_RDWR | libc::O_CLOEXEC;", SHARED),
 ("M11 no owner or mode check", 'src/store/shared.rs',
  "fn check_owner(path: &Path, st: &libc::stat) -> Result<()> {", "fn check_owner(path: &Path, st: &libc::stat) -> Result<()> {\n    if true { return Ok(()); }", SHARED),
 ("M12 no magic check", 'src/store/shared.rs', "if h.magic != MAGIC {", "if false {", SHARED),
 ("M13 half-written slots kept on claim", 'src/store/shared.rs',
  """                WRITING => {
                    slot.state.store(FREE, Ordering::Release);""", """                WRITING => {""", SHARED),
 ("M14 the last user never unlinks", 'src/store/shared.rs',
  "if last && self.header().kept.load(Ordering::Relaxed) == 0 {", "if false {", SHARED),
 ("M15 the kept flag is ignored", 'src/store/shared.rs',
  "if last && self.header().kept.load(Ordering::Relaxed) == 0 {", "if last {", SHARED),
 ("M16 read-only tags always copied", 'src/core.rs',
  "(Action::Offload, Some(kept)) if read_only != devmem_read_only::Off => {", "(Action::Offload, Some(kept)) if false => {", SHARED),
 ("M17 verification never finds a change", 'src/core.rs', "            if sum == Some(expect) {", "            if sum.is_some() {", SHARED),
 ("M18 no size check on restore", 'src/core.rs', "            if stored.size != a.size {", "            if false {", SHARED),
 ("M19 no checksum check on restore", 'src/core.rs', "                if Some(sum) != p.4.checksum {", "                if false {", SHARED),
 ("M20 backups in the region copied whole", 'src/store/mod.rs',
  """            return region
                .split(*ptr, len)""", """            return vec![(0usize, *ptr, len)]""", SHARED),
 ("M21 no host-memory bound for the region", 'src/store/shared.rs',
  ".map_err(|e| e.context(\"shared store: reserving this rank's area\"))?;", ";", SHARED),
 ("M22 a full device fails the sleep's checksums", 'src/store/pipeline.rs',
  "            Err(e) if e.status == devmem_status::OutOfMemory => {\n                log::warn!(\"devmem: sleep: no device memory",
  "            Err(e) if false => {\n                log::warn!(\"devmem: sleep: no device memory", SHARED),
 ("M23 a full device fails verification", 'src/core.rs',
  "            Err(e) if e.status == devmem_status::OutOfMemory => {\n                log::warn!(\"devmem: sleep: cannot verify",
  "            Err(e) if false => {\n                log::warn!(\"devmem: sleep: cannot verify", SHARED),
]
only = [a for a in sys.argv[1:] if not a.startswith('/')] 
for name, path, old, new, tests in muts:
    if only and not any(name.startswith(o) for o in only): continue
    full=os.path.join(root,path)
    src=open(full).read()
    assert old in src, name
    open(full,'w').write(src.replace(old,new))
    subprocess.run(['cargo','build','--workspace','-q'],cwd=root,env=env)
    fails=[]
    for backend in ('cuda','level_zero'):
        e=dict(env)
        if backend=='level_zero': e['DEVMEM_TEST_BACKEND']='level_zero'
        r=subprocess.run(['timeout','900','cargo','nextest','run','--workspace','--no-fail-fast','-j','2'] + (tests or []),cwd=root,env=e,capture_output=True,text=True)
        out=r.stdout+r.stderr
        f=sorted(set(re.findall(r'^\s+(?:FAIL|SIGABRT|SIGSEGV|TIMEOUT|ABORT)(?: \+ LEAK)?\s+\[.*?\]\s+\(.*?\)\s+(\S+ \S+)', out, re.M)))
        summ=[l for l in out.splitlines() if 'Summary' in l]
        fails.append((backend, summ[-1].strip() if summ else out[-500:], f))
    open(full,'w').write(src)
    with open(os.path.join(root, 'results.txt'), 'a') as fh:
        fh.write(f"== {name}\n")
        for b,s,f in fails:
            fh.write(f"  [{b}] {s}\n")
            for t in f: fh.write(f"     {t}\n")
