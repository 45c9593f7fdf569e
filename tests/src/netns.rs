//! Hosts for multi-host tests: Linux network namespaces that the test makes itself, each
//! with one interface on a private subnet (10.77.0.0/24), all joined by a bridge in a
//! namespace of its own (the "switch"). Nothing touches the machine's own network
//! namespace. A host's link can be cut and healed at its switch port. Dropping the
//! [`Lan`] kills every process left in its namespaces and deletes them.
//!
//! Needs root and iproute2 (`ip netns`); [`Lan::unavailable`] says why not, for a test to
//! skip with a clear message.

use std::ffi::OsStr;
use std::process::Command;

/// The subnet's first three octets.
const SUBNET: &str = "10.77.0";

/// A host: a network namespace with `eth0` at [`Host::ip`].
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace's name.
    pub ns: String,
    /// Its address on the LAN.
    pub ip: String,
    /// Its port's name in the switch namespace.
    port: String,
}

impl Host {
    /// A command running `program` on this host (`ip netns exec NS PROGRAM`, which execs:
    /// the child is the program itself, so SIGKILL reaches it).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns]).arg(program);
        command
    }
}

/// The test's LAN: the switch and the hosts made so far.
#[derive(Debug)]
pub struct Lan {
    prefix: String,
    switch: String,
    namespaces: Vec<String>,
    next_ip: u8,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

impl Lan {
    /// Why network namespaces cannot be made here (not root, no iproute2, no permission),
    /// or `None` when they can.
    pub fn unavailable() -> Option<String> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .is_some_and(|u| u.trim() == "0");
        if !root {
            return Some("network namespaces need root".to_owned());
        }
        let probe = format!("agora-probe-{}", std::process::id());
        match ip(&["netns", "add", &probe]) {
            Ok(()) => {
                let _ = ip(&["netns", "del", &probe]);
                None
            }
            Err(e) => Some(format!("cannot make a network namespace: {e}")),
        }
    }

    /// Makes the switch: a namespace holding bridge `br0`.
    ///
    /// # Panics
    /// If `ip` fails.
    pub fn start() -> Lan {
        let prefix = format!("agora{}", std::process::id());
        let switch = format!("{prefix}-switch");
        must(&["netns", "add", &switch]);
        let lan = Lan {
            prefix,
            switch: switch.clone(),
            namespaces: vec![switch.clone()],
            next_ip: 2,
        };
        must(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        must(&["-n", &switch, "link", "set", "br0", "up"]);
        lan
    }

    /// Makes a host named `name` (at most 15 bytes: it names its switch port) with the next
    /// free address, plugged into the switch, with loopback up.
    ///
    /// # Panics
    /// If `ip` fails or the subnet is full.
    pub fn host(&mut self, name: &str) -> Host {
        assert!(
            name.len() <= 15,
            "host name {name:?} is too long for an interface"
        );
        let ns = format!("{}-{name}", self.prefix);
        must(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let ip_addr = format!("{SUBNET}.{}", self.next_ip);
        self.next_ip = self.next_ip.checked_add(1).expect("subnet full");
        let sw = self.switch.clone();
        must(&[
            "-n", &sw, "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        must(&["-n", &sw, "link", "set", name, "master", "br0", "up"]);
        must(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "eth0",
        ]);
        must(&["-n", &ns, "link", "set", "eth0", "up"]);
        must(&["-n", &ns, "link", "set", "lo", "up"]);
        Host {
            ns,
            ip: ip_addr,
            port: name.to_owned(),
        }
    }

    /// Cuts `host` off the LAN (its switch port down): its packets go nowhere, as when a
    /// cable is pulled; its own interface stays up.
    ///
    /// # Panics
    /// If `ip` fails.
    pub fn cut(&self, host: &Host) {
        must(&["-n", &self.switch, "link", "set", &host.port, "down"]);
    }

    /// Plugs `host` back in.
    ///
    /// # Panics
    /// If `ip` fails.
    pub fn heal(&self, host: &Host) {
        must(&["-n", &self.switch, "link", "set", &host.port, "up"]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            // Whatever still runs there (a test that panicked early).
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
