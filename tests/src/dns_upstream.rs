//! A real DNS server (dnsmasq) on loopback as the agent's upstream.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{free_port_range, unique};

/// A real DNS server (dnsmasq) on loopback as the agent's upstream. Its records come from a
/// hosts file that [`Dnsmasq::set_hosts`] rewrites (dnsmasq re-reads it on SIGHUP); every
/// query it receives is logged, for "nothing reached the upstream" checks.
pub struct Dnsmasq {
    pub addr: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl Dnsmasq {
    /// `hosts`: lines of a hosts file (`ADDRESS NAME`). TTL of every answer: `ttl` seconds.
    pub fn start(hosts: &str, ttl: u32) -> Self {
        let dir = std::env::temp_dir().join(unique("dnsmasq"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), hosts).unwrap();
        let port = free_port_range(1);
        let conf = format!(
            "port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n\
             addn-hosts={hosts}\nlocal-ttl={ttl}\nlog-queries\nlog-facility={log}\n\
             local=/\n",
            hosts = dir.join("hosts").display(),
            log = dir.join("queries.log").display(),
        );
        std::fs::write(dir.join("dnsmasq.conf"), conf).unwrap();
        let child = Command::new("dnsmasq")
            .arg("--keep-in-foreground")
            .arg(format!(
                "--conf-file={}",
                dir.join("dnsmasq.conf").display()
            ))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dnsmasq (installed by `cargo xtask setup`)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let d = Dnsmasq { addr, dir, child };
        let end = Instant::now() + Duration::from_secs(10);
        while !d.log().contains("started") && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// Replaces the records and has dnsmasq re-read them.
    pub fn set_hosts(&self, hosts: &str) {
        let before = self.log().matches("read ").count();
        std::fs::write(self.dir.join("hosts"), hosts).unwrap();
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        let end = Instant::now() + Duration::from_secs(10);
        while self.log().matches("read ").count() <= before && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything dnsmasq logged (with `log-queries`: one line per query it received).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("queries.log")).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
