//! Container discovery: Docker-named cgroups under a guarded cgroup get the policy their
//! selectors pick, and until then the guarded cgroup's own policy holds them.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use egress_guard_e2e::*;

use crate::setup;

/// A fake Docker root (`containers/<id>/config.v2.json`), removed on drop.
struct DockerRoot(PathBuf);

impl DockerRoot {
    fn new() -> Self {
        Self(std::env::temp_dir().join(unique("docker")))
    }

    fn add(&self, id: &str, name: &str, labels: &str) {
        let dir = self.0.join("containers").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.v2.json"),
            format!(r#"{{"Name":"/{name}","Config":{{"Labels":{labels}}}}}"#),
        )
        .unwrap();
    }
}

impl Drop for DockerRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scope(parent: &Path, id: &str) -> PathBuf {
    let p = parent.join(format!("docker-{id}.scope"));
    std::fs::create_dir(&p).unwrap();
    p
}

/// Polls until a connect from `cgroup` to `to` is allowed; panics after 3 s.
fn wait_allowed(cgroup: &Path, to: &str, what: &str) {
    let start = Instant::now();
    while !probe_in(cgroup, &["tcp", to]).ok() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{what}: never allowed to {to}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn containers_get_the_policy_their_selectors_pick_and_the_parents_until_then() {
    setup();
    let parent = TestCgroup::new("discovery");
    let docker = DockerRoot::new();
    let app_dest = tcp_listener("127.0.0.2").to_string();
    let db_dest = tcp_listener("127.0.0.4").to_string();
    let denied = tcp_listener("127.0.0.3").to_string();
    let (app_id, db_id, other_id) = ("a1".repeat(32), "b2".repeat(32), "c3".repeat(32));
    docker.add(&app_id, "eg-app-1", "{}");
    docker.add(&db_id, "eg-db", r#"{"role":"db"}"#);
    docker.add(&other_id, "eg-other", r#"{"role":"web"}"#);
    // The db container exists before the agent starts: matched by the start-up scan.
    let db = scope(&parent.path, &db_id);
    let body = format!(
        "[docker]\nroot = \"{}\"\n\
         [[policy]]\nname = \"sandbox\"\ncgroups = [\"{}\"]\n\
         [[policy]]\nname = \"app\"\ncontainers = [\"name:eg-app-*\"]\nallow = [\"{app_dest}\"]\n\
         [[policy]]\nname = \"db\"\ncontainers = [\"label:role=db\"]\nallow = [\"{db_dest}\"]\n",
        docker.0.display(),
        parent.rel()
    );
    let mut agent = Agent::start(&body);
    assert!(
        probe_in(&db, &["tcp", &db_dest]).ok(),
        "db container not matched at start"
    );
    assert!(probe_in(&db, &["tcp", &app_dest]).eperm());

    // A container appearing while the agent runs: a process placed in it at once never gets
    // anywhere the parent's policy refuses, and it gets the app policy within moments.
    let app = scope(&parent.path, &app_id);
    let denied_loop = std::thread::spawn({
        let (app, denied) = (app.clone(), denied.clone());
        move || probe_in(&app, &["loop", "tcp", &denied, "1000"]).stdout
    });
    wait_allowed(&app, &app_dest, "the app container");
    let out = denied_loop.join().unwrap();
    assert!(
        out.contains("ok=0 "),
        "the new container reached a refused address: {out}"
    );
    assert!(!out.contains("eperm=0 "), "the loop did not run: {out}");
    assert!(
        probe_in(&app, &["tcp", &db_dest]).eperm(),
        "app reached db's destination"
    );

    // No selector matches: the container stays under the parent's policy.
    let other = scope(&parent.path, &other_id);
    std::thread::sleep(Duration::from_millis(300));
    assert!(probe_in(&other, &["tcp", &app_dest]).eperm());
    assert!(probe_in(&other, &["tcp", &db_dest]).eperm());

    // The control socket says who got what; records name the container's policy.
    let out = agent.ctl(&["targets", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let containers = v["targets"][0]["containers"].as_array().unwrap().clone();
    let policy_of = |id: &str| {
        containers
            .iter()
            .find(|c| id.starts_with(c["id"].as_str().unwrap()))
            .map(|c| (c["policy"].as_str().unwrap().to_string(), c["name"].clone()))
            .unwrap_or_else(|| panic!("{id} not in {containers:?}"))
    };
    assert_eq!(policy_of(&app_id).0, "app");
    assert_eq!(policy_of(&app_id).1, "eg-app-1");
    assert_eq!(policy_of(&db_id).0, "db");
    assert_eq!(policy_of(&other_id).0, "sandbox");
    // `check --container` asks the policy that decides for the container.
    let check = |id: &str, dest: &str| agent.ctl(&["check", dest, "--container", &id[..12]]).status;
    assert!(check(&app_id, &app_dest).success(), "check: app → app_dest");
    assert_eq!(
        check(&other_id, &app_dest).code(),
        Some(1),
        "check: other → app_dest"
    );
    // Records reach the file a moment after the connect.
    let start = Instant::now();
    while !agent.records().iter().any(|r| {
        r["type"] == "net.connect"
            && r["policy"] == "app"
            && r["container_name"] == "eg-app-1"
            && r["verdict"] == "allow"
    }) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no allowed net.connect of the app container under policy app"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A restart keeps every match (the map is pinned, and the scan finds them again).
    agent.kill9();
    assert!(probe_in(&app, &["tcp", &app_dest]).ok());
    agent.spawn();
    assert!(probe_in(&app, &["tcp", &app_dest]).ok());
    assert!(probe_in(&other, &["tcp", &app_dest]).eperm());

    // A reload that drops the selector puts the container back under the parent's policy.
    agent.rewrite_config(&body.replace("name:eg-app-*", "name:nothing-matches"));
    let out = agent.ctl(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(probe_in(&app, &["tcp", &app_dest]).eperm());
}
