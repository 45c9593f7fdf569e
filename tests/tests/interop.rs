//! A client in another language: the pyzmq client in `tests/interop/`, written from
//! docs/PROTOCOL.md alone, against the real binaries.

use std::process::Command;
use std::time::Duration;

use agora_tests::{wait_for, Federation};

#[test]
fn a_pyzmq_client_joins_sends_and_reads_history() {
    let have_pyzmq = Command::new("python3")
        .args(["-c", "import zmq"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_pyzmq,
        "python3 with pyzmq is required (scripts/test.sh installs it: pip install pyzmq)"
    );
    let fed = Federation::start("200ms");
    let _node = fed.node("Cool Group", "127.0.0.1:0", "cool", &[]);
    assert!(wait_for(Duration::from_secs(10), || {
        fed.cli("alice", &["groups"], "")
            .stdout
            .contains("Cool Group")
    }));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/agora_client.py");
    let out = Command::new("python3")
        .args([
            script,
            &fed.registry.endpoint,
            &fed.registry_key(),
            "Cool Group",
        ])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(stdout.trim(), "interop ok");
}
