//! Runs `tests/packaging.sh`, the static checks of the packaging files that the real runs of
//! `tests/it/container.rs` and `tests/it/systemd.rs` cannot make: the linters (hadolint,
//! `systemd-analyze verify`, shellcheck), the Dockerfile's build stages and build context, and the
//! drain deadline of the unit and the Okteto manifest.

#[test]
fn packaging_files_pass_their_checks() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/packaging.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .expect("run tests/packaging.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tests/packaging.sh failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
