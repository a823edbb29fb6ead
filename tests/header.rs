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
fn library_does_not_link_libcuda() {
    let exe = std::env::current_exe().expect("test binary");
    let lib = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("profile dir")
        .join("libdevmem.so");
    let bytes = std::fs::read(&lib).expect("libdevmem.so is built with the tests");
    let needle = b"libcuda.so";
    // The default library name appears as a string constant; a DT_NEEDED entry would also add
    // the name to the dynamic string table. Check the dynamic section with readelf when present.
    let out = std::process::Command::new("readelf")
        .arg("-d")
        .arg(&lib)
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                !text
                    .lines()
                    .any(|l| l.contains("NEEDED") && l.contains("libcuda")),
                "{text}"
            );
            assert!(
                text.contains("SONAME") && text.contains("libdevmem.so.0"),
                "{text}"
            );
        }
        _ => assert!(bytes.windows(needle.len()).any(|w| w == needle)),
    }
}
