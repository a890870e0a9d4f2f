//! The committed header (`bindings/c/include/knit.h`) and the Python cffi declarations
//! (`bindings/python/knit/_knit_cdef.h`) must be exactly what cbindgen generates from this
//! crate now. `KNIT_UPDATE_HEADER=1 cargo test -p knit-ffi --test header` rewrites them.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ffi/ has a parent")
        .to_path_buf()
}

fn generate(config: &str) -> String {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join(config)).expect("cbindgen config");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

fn check(config: &str, committed: &str) {
    let fresh = generate(config);
    let path = root().join(committed);
    if std::env::var_os("KNIT_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &fresh).expect("writing the header");
        return;
    }
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    if old != fresh {
        let first = old
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(old.lines().count().min(fresh.lines().count()));
        panic!(
            "{committed} is stale (first difference at line {}): regenerate it with \
             `KNIT_UPDATE_HEADER=1 cargo test -p knit-ffi --test header` and commit it",
            first + 1
        );
    }
}

#[test]
fn c_header_is_current() {
    check("cbindgen.toml", "bindings/c/include/knit.h");
}

#[test]
fn python_cdef_is_current() {
    check("cbindgen-cffi.toml", "bindings/python/knit/_knit_cdef.h");
}
