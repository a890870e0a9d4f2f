//! Builds the C and C++ test programs in `bindings/` against the library cargo just built
//! (`target/<profile>/deps/libknit.so`, next to this test binary), with warnings as errors and
//! under AddressSanitizer + UndefinedBehaviorSanitizer, and runs each against an embedded
//! gateway on a private socket. Each program exits 0 only when every check in it passed.

use knit_core::gateway::{Gateway, GatewayConfig, GatewayHandle};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ffi/ has a parent")
        .to_path_buf()
}

/// Where cargo put `libknit.so` for this test run.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().expect("deps dir").to_path_buf();
    assert!(
        dir.join("libknit.so").exists(),
        "libknit.so not found next to the test binary in {}",
        dir.display()
    );
    dir
}

struct Fixture {
    dir: PathBuf,
    gw: Option<GatewayHandle>,
}

impl Fixture {
    /// A private gateway that allows payloads of at most 1 MiB (the C test relies on it).
    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("knit-ffi-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = GatewayConfig::new(dir.join("gw.sock"));
        cfg.limits.max_payload = 1 << 20;
        let gw = Gateway::bind(cfg)
            .expect("binding the gateway")
            .spawn()
            .expect("starting the gateway");
        Fixture { dir, gw: Some(gw) }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("gw.sock")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(gw) = self.gw.take() {
            gw.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Compiles `source` with `compiler` and `flags`, links it to libknit, and returns the binary.
fn build(compiler: &str, flags: &[&str], source: &Path, out_dir: &Path) -> PathBuf {
    let lib = lib_dir();
    let exe = out_dir.join(source.file_stem().expect("source name"));
    let mut cmd = Command::new(compiler);
    cmd.args(flags)
        .arg(source)
        .arg(format!("-I{}", repo().join("bindings/c/include").display()))
        .arg(format!(
            "-I{}",
            repo().join("bindings/cpp/include").display()
        ))
        .arg(format!("-L{}", lib.display()))
        .arg("-lknit")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-pthread")
        .arg("-o")
        .arg(&exe);
    run(&mut cmd, &format!("{compiler} {}", source.display()));
    exe
}

/// Runs a test program against the fixture's gateway, under a time limit.
fn run_test_program(exe: &Path, fx: &Fixture) -> String {
    let mut cmd = Command::new("timeout");
    cmd.arg("--kill-after=5")
        .arg("120")
        .arg(exe)
        .arg(fx.socket())
        // Leak checking stays on: knit frees everything a closed client owned. Exit code 23
        // tells an ASan report apart from a failed check (exit 1).
        .env(
            "ASAN_OPTIONS",
            "detect_leaks=1:exitcode=23:abort_on_error=0",
        )
        .env(
            "UBSAN_OPTIONS",
            "print_stacktrace=1:halt_on_error=1:exitcode=24",
        )
        // cargo's own LD_LIBRARY_PATH also names target/<profile>, where an older libknit.so
        // from `cargo build` may lie: the program must load the one this test run built.
        .env("LD_LIBRARY_PATH", lib_dir())
        .env_remove("KNIT_GATEWAY");
    run(&mut cmd, &exe.display().to_string())
}

const SANITIZE: &[&str] = &[
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-g",
];

#[test]
fn c_program_calls_every_function_and_survives_misuse_under_sanitizers() {
    let fx = Fixture::new("c");
    let flags = [&["-std=c11", "-Wall", "-Wextra", "-Werror"][..], SANITIZE].concat();
    let exe = build(
        "gcc",
        &flags,
        &repo().join("bindings/c/tests/test_abi.c"),
        &fx.dir,
    );
    let out = run_test_program(&exe, &fx);
    assert!(out.contains(", 0 failed"), "unexpected output:\n{out}");
}

#[test]
fn c_subscription_program_covers_contexts_bus_streams_and_events_under_sanitizers() {
    let fx = Fixture::new("csub");
    let flags = [&["-std=c11", "-Wall", "-Wextra", "-Werror"][..], SANITIZE].concat();
    let exe = build(
        "gcc",
        &flags,
        &repo().join("bindings/c/tests/test_subscriptions.c"),
        &fx.dir,
    );
    let out = run_test_program(&exe, &fx);
    assert!(out.contains(", 0 failed"), "unexpected output:\n{out}");
}

#[test]
fn header_compiles_as_c99_and_cpp_without_warnings() {
    let fx = Fixture::new("hdr");
    let src = fx.dir.join("hdr.c");
    std::fs::write(
        &src,
        "#include <knit.h>\nint main(void) { return knit_status_string(KNIT_OK) == 0; }\n",
    )
    .expect("writing hdr.c");
    let c = build(
        "gcc",
        &["-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror"],
        &src,
        &fx.dir,
    );
    run(&mut Command::new(&c), "hdr (C)");
    let srcpp = fx.dir.join("hdrpp.cpp");
    std::fs::copy(&src, &srcpp).expect("copying");
    let cpp = build(
        "g++",
        &["-std=c++11", "-Wall", "-Wextra", "-Wpedantic", "-Werror"],
        &srcpp,
        &fx.dir,
    );
    run(&mut Command::new(&cpp), "hdr (C++)");
}

#[test]
fn cpp_wrapper_tests_pass_under_sanitizers() {
    let fx = Fixture::new("cpp");
    let flags = [&["-std=c++17", "-Wall", "-Wextra", "-Werror"][..], SANITIZE].concat();
    let exe = build(
        "g++",
        &flags,
        &repo().join("bindings/cpp/tests/test_knit.cpp"),
        &fx.dir,
    );
    let out = run_test_program(&exe, &fx);
    assert!(out.contains(", 0 failed"), "unexpected output:\n{out}");
}
