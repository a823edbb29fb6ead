//! The state machine against a model: random sequences of malloc / free / write / check /
//! sleep / offload / discard / wake, checked after every step against a simple model of each
//! allocation's state and bytes (and the emulator's view of what is mapped).
//!
//! CI runs `PROPTEST_CASES` (default 500) sequences of up to `DEVMEM_MODEL_OPS` (default 40)
//! steps; the documented longer run is `DEVMEM_MODEL_OPS=10000 PROPTEST_CASES=500`.

mod common;

use std::ffi::c_void;

use common::*;
use devmem::{devmem_state, devmem_status, ffi};
use proptest::prelude::*;

const TAGS: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Step {
    Malloc { blocks: usize, tag: usize },
    Free { idx: usize },
    Write { idx: usize, seed: u64 },
    Check { idx: usize },
    Sleep { offload: [bool; 3] },
    Offload { tag: usize },
    Discard { tag: usize },
    Wake { tag: Option<usize> },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1usize..4, 0usize..3).prop_map(|(blocks, tag)| Step::Malloc { blocks, tag }),
        1 => (0usize..16).prop_map(|idx| Step::Free { idx }),
        3 => (0usize..16, 0u64..1000).prop_map(|(idx, seed)| Step::Write { idx, seed }),
        2 => (0usize..16).prop_map(|idx| Step::Check { idx }),
        1 => any::<[bool; 3]>().prop_map(|offload| Step::Sleep { offload }),
        1 => (0usize..3).prop_map(|tag| Step::Offload { tag }),
        1 => (0usize..3).prop_map(|tag| Step::Discard { tag }),
        2 => proptest::option::of(0usize..3).prop_map(|tag| Step::Wake { tag }),
    ]
}

#[derive(Debug)]
struct Model {
    ptr: u64,
    size: usize,
    tag: usize,
    state: devmem_state,
    /// The seed of the bytes it must hold, when they are known.
    contents: Option<u64>,
}

fn tag_list(mask: &[bool; 3]) -> Vec<&'static str> {
    TAGS.iter()
        .zip(mask)
        .filter(|(_, on)| **on)
        .map(|(t, _)| *t)
        .collect()
}

/// Tag names for one thread of the threaded run ("t1.a", ...); the single-threaded run uses
/// the plain names.
fn tag_name(thread: Option<usize>, tag: usize) -> String {
    match thread {
        None => TAGS[tag].to_string(),
        Some(t) => format!("t{t}.{}", TAGS[tag]),
    }
}

/// What a sleep does in the model: mapped allocations of offloaded tags keep their bytes, the
/// others lose them.
fn model_sleep(model: &mut [Model], offload: &[bool; 3]) {
    for m in model.iter_mut().filter(|m| m.state == devmem_state::Mapped) {
        if offload[m.tag] {
            m.state = devmem_state::Offloaded;
        } else {
            m.state = devmem_state::Discarded;
            m.contents = None;
        }
    }
}

fn apply(step: &Step, model: &mut Vec<Model>) {
    apply_as(None, step, model);
}

/// Applies a step for `thread` (None: the only thread). Threads own disjoint tags, so each
/// thread's model is exact even while the others run; a global sleep would touch every
/// thread's allocations, so threads turn it into per-tag offloads and discards.
fn apply_as(thread: Option<usize>, step: &Step, model: &mut Vec<Model>) {
    let name = |tag: usize| tag_name(thread, tag);
    match step {
        Step::Malloc { blocks, tag } => {
            if model.len() >= 16 {
                return;
            }
            let size = blocks * 2 * MIB;
            let ptr = alloc(size, &name(*tag));
            model.push(Model {
                ptr,
                size,
                tag: *tag,
                state: devmem_state::Mapped,
                contents: None,
            });
        }
        Step::Free { idx } => {
            if !model.is_empty() {
                let m = model.remove(idx % model.len());
                ok(ffi::devmem_free(m.ptr as *mut c_void));
            }
        }
        Step::Write { idx, seed } => {
            let len = model.len().max(1);
            if let Some(m) = model.get_mut(idx % len) {
                if m.state == devmem_state::Mapped {
                    fill(m.ptr, m.size, *seed);
                    m.contents = Some(*seed);
                }
            }
        }
        Step::Check { idx } => {
            if let Some(m) = model.get(idx % model.len().max(1)) {
                if let (devmem_state::Mapped, Some(seed)) = (m.state, m.contents) {
                    assert_eq!(mismatches(m.ptr, m.size, seed), 0, "bytes of {:#x}", m.ptr);
                }
            }
        }
        Step::Sleep { offload } if thread.is_some() => {
            for (tag, keep) in offload.iter().enumerate() {
                let t = name(tag);
                let (_o, list) = tags(&[t.as_str()]);
                if *keep {
                    ok(ffi::devmem_offload(list.as_ptr(), 1));
                } else {
                    ok(ffi::devmem_discard(list.as_ptr(), 1));
                }
            }
            model_sleep(model, offload);
        }
        Step::Sleep { offload } => {
            ok(sleep(&tag_list(offload)));
            model_sleep(model, offload);
        }
        Step::Offload { tag } => {
            let n = name(*tag);
            let (_o, t) = tags(&[n.as_str()]);
            ok(ffi::devmem_offload(t.as_ptr(), 1));
            for m in model
                .iter_mut()
                .filter(|m| m.state == devmem_state::Mapped && m.tag == *tag)
            {
                m.state = devmem_state::Offloaded;
            }
        }
        Step::Discard { tag } => {
            let n = name(*tag);
            let (_o, t) = tags(&[n.as_str()]);
            ok(ffi::devmem_discard(t.as_ptr(), 1));
            for m in model
                .iter_mut()
                .filter(|m| m.state == devmem_state::Mapped && m.tag == *tag)
            {
                m.state = devmem_state::Discarded;
                m.contents = None;
            }
        }
        Step::Wake { tag } => {
            match (tag, thread) {
                (None, None) => ok(wake(None)),
                (None, Some(_)) => {
                    let names: Vec<String> = (0..3).map(name).collect();
                    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                    ok(wake(Some(&refs)));
                }
                (Some(t), _) => ok(wake(Some(&[name(*t).as_str()]))),
            }
            for m in model.iter_mut().filter(|m| tag.is_none_or(|t| m.tag == t)) {
                if m.state == devmem_state::Offloaded {
                    if let Some(seed) = m.contents {
                        assert_eq!(
                            mismatches(m.ptr, m.size, seed),
                            0,
                            "bytes of {:#x} after wake",
                            m.ptr
                        );
                    }
                }
                m.state = devmem_state::Mapped;
            }
        }
    }
}

fn check(model: &[Model]) {
    check_own(model);
    let mut mapped = 0u64;
    let mut offloaded = 0u64;
    let mut discarded = 0u64;
    for m in model {
        match m.state {
            devmem_state::Mapped => mapped += m.size as u64,
            devmem_state::Offloaded => offloaded += m.size as u64,
            devmem_state::Discarded => discarded += m.size as u64,
        }
    }
    let s = stats(None);
    assert_eq!(s.allocations.current, model.len() as u64);
    assert_eq!(
        (
            s.mapped_bytes.current,
            s.offloaded_bytes.current,
            s.discarded_bytes.current
        ),
        (mapped, offloaded, discarded)
    );
    let mut free = 0usize;
    let mut total = 0usize;
    assert_eq!(
        ffi::devmem_mem_get_info(0, &mut free, &mut total),
        devmem_status::Success
    );
    assert_eq!(
        (total - free) as u64,
        mapped,
        "device memory in use equals the mapped bytes"
    );
}

fn ops() -> usize {
    std::env::var("DEVMEM_MODEL_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(500),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn devmem_follows_the_model(steps in proptest::collection::vec(step(), 1..=ops())) {
        setup(&[("DEVMEM_EMU_CAPACITY", "256M")]);
        let mut model: Vec<Model> = Vec::new();
        for s in &steps {
            apply(s, &mut model);
            check(&model);
        }
        for m in &model {
            ok(ffi::devmem_free(m.ptr as *mut c_void));
        }
        assert_no_device_leaks();
    }
}

/// Per-thread check for the threaded run: states, mappings and bytes of this thread's
/// allocations (global statistics move with the other threads).
fn check_own(model: &[Model]) {
    for m in model {
        assert_eq!(state(m.ptr), m.state, "state of {:#x}", m.ptr);
        let expected_mapping = if m.state == devmem_state::Mapped {
            2
        } else {
            0
        };
        assert_eq!(
            emu().mapping(m.ptr),
            expected_mapping,
            "mapping of {:#x}",
            m.ptr
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(500) / 5,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Three threads, each with its own tags and model, run their sequences at once.
    #[test]
    fn threads_follow_their_models(
        programs in proptest::collection::vec(proptest::collection::vec(step(), 1..=ops()), 3)
    ) {
        setup(&[("DEVMEM_EMU_CAPACITY", "512M")]);
        std::thread::scope(|scope| {
            for (t, program) in programs.iter().enumerate() {
                scope.spawn(move || {
                    let mut model: Vec<Model> = Vec::new();
                    for s in program {
                        apply_as(Some(t), s, &mut model);
                        check_own(&model);
                    }
                    for m in &model {
                        ok(ffi::devmem_free(m.ptr as *mut c_void));
                    }
                });
            }
        });
        assert_no_device_leaks();
    }
}
