//! The committed include/devmem.h must equal the header build.rs generates, and the library
//! must not link libcuda.

use std::path::Path;

#[test]
fn committed_header_is_fresh() {
    let generated = std::fs::read_to_string(Path::new(env!("OUT_DIR")).join("devmem.h"))
        .expect("build.rs writes OUT_DIR/devmem.h");
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/devmem.h"))
            .unwrap_or_default();
    assert!(
        generated == committed,
        "include/devmem.h is stale: run scripts/refresh-header.sh and commit the result"
    );
}

#[test]
fn header_declares_no_sleep_symbol() {
    let header = include_str!("../include/devmem.h");
    for line in header.lines() {
        let code = line.split("//").next().unwrap_or("");
        assert!(
            !code.contains(" sleep("),
            "the header must not declare sleep(): {line}"
        );
    }
    assert!(header.contains("devmem_sleep("));
    assert!(header.contains("#ifndef DEVMEM_H"));
}

#[test]
fn library_links_no_gpu_library() {
    let exe = std::env::current_exe().expect("test binary");
    let lib = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("profile dir")
        .join("libdevmem.so");
    assert!(lib.exists(), "{} is built with the tests", lib.display());
    // The library's dynamic section, read by binutils' readelf (.ci/run installs it): the
    // default driver name is a string inside the library, so searching its bytes would
    // always succeed and prove nothing.
    let out = std::process::Command::new("readelf")
        .arg("--dynamic")
        .arg(&lib)
        .output()
        .expect("readelf (binutils) is needed to read the dynamic section");
    assert!(out.status.success(), "readelf failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("(NEEDED)"),
        "readelf printed no NEEDED entry at all; the check would prove nothing:\n{text}"
    );
    for gpu in ["libcuda", "libamdhip64", "libze_loader"] {
        assert!(
            !text
                .lines()
                .any(|l| l.contains("(NEEDED)") && l.contains(gpu)),
            "{gpu} is linked:\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.contains("(SONAME)") && l.contains("libdevmem.so.0")),
        "{text}"
    );
}

#[test]
fn every_macro_in_the_header_is_prefixed() {
    let header = include_str!("../include/devmem.h");
    let macros: Vec<&str> = header
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("#define "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert!(macros.contains(&"DEVMEM_MAX_TAG_LEN"), "{macros:?}");
    let bare: Vec<&&str> = macros
        .iter()
        .filter(|m| !m.starts_with("DEVMEM_"))
        .collect();
    assert!(bare.is_empty(), "unprefixed macros in devmem.h: {bare:?}");
}

/// README's C example is `examples/readme.c` verbatim, which the C tests build and run (on
/// the emulator in CI, on the GPU in scripts/gpu-check.sh): the snippet users copy compiles,
/// checks every return, and runs on the default 1 GiB emulator.
#[test]
fn the_readme_c_example_is_the_tested_file() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README.md");
    let example = std::fs::read_to_string(format!("{root}/examples/readme.c")).expect("example");
    assert!(
        readme.contains(&format!("```c\n{example}```")),
        "README.md must show examples/readme.c verbatim in a ```c block"
    );
}

/// The header compiles alone as C99 and C11 (no `bool` without `<stdbool.h>`, no C++-only
/// construct) with warnings as errors: a struct field typed `bool` once broke every C caller.
#[test]
fn header_compiles_as_plain_c() {
    let header = concat!(env!("CARGO_MANIFEST_DIR"), "/include/devmem.h");
    for std in ["-std=c99", "-std=c11"] {
        let out = std::process::Command::new("cc")
            .args([
                std,
                "-Wall",
                "-Wextra",
                "-Werror",
                "-fsyntax-only",
                "-x",
                "c",
                header,
            ])
            .output()
            .expect("cc runs (a C compiler is needed to build the C tests)");
        assert!(
            out.status.success(),
            "include/devmem.h does not compile as C ({std}):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
