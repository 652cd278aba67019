//! Runs `tests/packaging.sh`, the static checks of the Dockerfile, `.dockerignore`, the systemd unit
//! and the Okteto manifest: what the real runs of `tests/container.rs` and `tests/systemd.rs` cannot
//! tell apart (hadolint, `systemd-analyze verify`, shellcheck, the unit's settings).

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
