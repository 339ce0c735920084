//! What operators deploy: the BOSH release's templates rendered with Ruby's ERB (a small
//! stand-in for the director's helpers: no bosh CLI installs here) and fed to
//! `brokerage check`, the manifests linted against the release's specs, the static binary
//! the cf manifest pushes, and the operator endpoints (`/ready`, `/metrics`, HTTPS).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

fn release() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/bosh")
}

/// Renders one template of a job; Err carries what ruby said.
fn render(
    job: &str,
    template: &str,
    props: &Value,
    links: Option<&Value>,
    dir: &Path,
) -> Result<String, String> {
    let props_file = dir.join(format!("props-{}.json", uuid::Uuid::new_v4().simple()));
    std::fs::write(&props_file, props.to_string()).unwrap();
    let out = dir.join(format!("out-{}", uuid::Uuid::new_v4().simple()));
    let mut cmd = Command::new("ruby");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/render_erb.rb"
    ))
    .arg(release().join(format!("jobs/{job}/spec")))
    .arg(release().join(format!("jobs/{job}/templates/{template}")))
    .arg(&props_file)
    .arg(&out);
    if let Some(links) = links {
        let links_file = dir.join("links.json");
        std::fs::write(&links_file, links.to_string()).unwrap();
        cmd.arg(&links_file);
    }
    let done = cmd.output().expect("ruby runs (scripts/test installs it)");
    if done.status.success() {
        Ok(std::fs::read_to_string(out).unwrap())
    } else {
        Err(String::from_utf8_lossy(&done.stderr).to_string())
    }
}

fn check(config: &Path, dir: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_brokerage"))
        .args(["check", "--config"])
        .arg(config)
        .current_dir(dir)
        .env_remove("PORT")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn bash_syntax_ok(script: &str, dir: &Path) -> bool {
    let file = dir.join(format!("script-{}.sh", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, script).unwrap();
    Command::new("bash")
        .arg("-n")
        .arg(&file)
        .status()
        .unwrap()
        .success()
}

fn self_signed() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn the_brokerage_job_renders_for_default_and_full_properties_and_the_broker_accepts_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.redb").display().to_string();
    let minimal = json!({"brokerage": {
        "external_url": "https://brokerage.sys.example.com",
        "credentials": [{"username": "broker", "password": "generated-broker-password"}],
        "sso": {"session_secret": "generated-session-secret-of-48-characters-xxxxxx"},
        "backends": {"mysql": {"url": mysql_url()}},
        "store": {"path": state},
    }});
    let (cert, key) = self_signed();
    let full = json!({"brokerage": {
        "listen": {"port": 9443, "limits": {"max_connections": 2048, "header_timeout_secs": 5}},
        "external_url": "https://brokerage.sys.example.com",
        "credentials": [{"username": "broker", "password": "generated-broker-password"},
                        {"username": "rotating", "password": "the-next-broker-password"}],
        "metrics": {"credentials": [{"username": "prometheus", "password": "scrape-password-1"}]},
        "tls": {"certificate": cert, "private_key": key},
        "store": {"kind": "mysql", "url": format!("{}/bkgstore_{}", mysql_url(), uuid::Uuid::new_v4().simple())},
        "broker": {"operation_timeout_secs": 20, "retry_after_secs": 10, "max_body_bytes": 65536, "quota_interval_secs": 3},
        "log": {"format": "text", "level": "debug"},
        "backends": {"mysql": {"url": mysql_url(), "public_host": "mysql.service.internal", "public_port": 3306, "max_total_storage_mb": 102400},
                     "mongodb": {"url": std::env::var("BKG_TEST_MONGODB_URL").unwrap()},
                     "swift": {"url": std::env::var("BKG_TEST_SWIFT_URL").unwrap(),
                               "admin_key": std::env::var("BKG_TEST_SWIFT_ADMIN_KEY").unwrap()}},
        "catalog": {"services": [{"id": "svc-1", "name": "small-db", "backend": "mysql", "description": "d",
            "bindable": true, "plans": [{"id": "plan-1", "name": "tiny", "description": "d",
            "max_storage_mb": 10, "max_user_connections": 2}]}]},
        "upstreams": [{"alias": "market", "url": "http://127.0.0.1:9", "request_timeout_secs": 10}],
        "federation": {"refresh_secs": 15, "catalog_ttl_secs": 120},
        "sso": {"session_secret": "generated-session-secret-of-48-characters-xxxxxx",
                "authorization_endpoint": "https://login.sys.example.com",
                "token_endpoint": "https://uaa.sys.example.com",
                "cloud_controller_url": "https://api.sys.example.com",
                "allowed_cloud_controllers": ["api.sys.example.com", "api.other.example.com:8443"],
                "session_lifetime_secs": 1800},
    }});
    for (name, props) in [("minimal", &minimal), ("full", &full)] {
        let config = render("brokerage", "brokerage.yml.erb", props, None, dir.path()).unwrap();
        let file = dir.path().join(format!("{name}.yml"));
        let mut rendered: Value = serde_yaml::from_str(&config).unwrap();
        if name == "full" {
            // The TLS files live where BOSH writes the other templates; point at copies.
            let (crt, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
            std::fs::write(
                &crt,
                render("brokerage", "tls.crt.erb", props, None, dir.path()).unwrap(),
            )
            .unwrap();
            std::fs::write(
                &key_file,
                render("brokerage", "tls.key.erb", props, None, dir.path()).unwrap(),
            )
            .unwrap();
            assert_eq!(
                rendered["listen"]["tls"]["certificate"],
                "/var/vcap/jobs/brokerage/config/tls/brokerage.crt"
            );
            rendered["listen"]["tls"] = json!({"certificate": crt, "private_key": key_file});
            assert_eq!(rendered["catalog"]["services"][0]["name"], "small-db");
            assert_eq!(rendered["listen"]["max_connections"], 2048);
            assert_eq!(
                rendered["sso"]["allowed_cloud_controllers"][1],
                "api.other.example.com:8443"
            );
            assert_eq!(
                rendered["backends"]["swift"]["admin_key"],
                std::env::var("BKG_TEST_SWIFT_ADMIN_KEY").unwrap()
            );
        }
        std::fs::write(&file, serde_yaml::to_string(&rendered).unwrap()).unwrap();
        let (ok, said) = check(&file, dir.path());
        // The full set names an upstream that is not running: everything else must pass.
        let failures: Vec<&str> = said.lines().filter(|l| l.starts_with("FAIL")).collect();
        if name == "minimal" {
            assert!(ok, "{name}: {said}");
        } else {
            assert_eq!(failures.len(), 1, "{said}");
            assert!(failures[0].starts_with("FAIL  upstreams.market"), "{said}");
        }
        assert!(said.contains("ok    configuration"), "{said}");

        let bpm: Value = serde_yaml::from_str(
            &render("brokerage", "bpm.yml.erb", props, None, dir.path()).unwrap(),
        )
        .unwrap();
        assert_eq!(
            bpm["processes"][0]["executable"],
            "/var/vcap/packages/brokerage/bin/brokerage"
        );
        assert_eq!(
            bpm["processes"][0]["args"][2],
            "/var/vcap/jobs/brokerage/config/brokerage.yml"
        );
        assert_eq!(
            bpm["processes"][0]["persistent_disk"]
                .as_bool()
                .unwrap_or(false),
            name == "minimal",
            "the embedded store needs the persistent disk"
        );
        let ready = render("brokerage", "ready.erb", props, None, dir.path()).unwrap();
        assert!(bash_syntax_ok(&ready, dir.path()), "{ready}");
        assert!(ready.contains(if name == "full" {
            "https://127.0.0.1:9443/ready"
        } else {
            "http://127.0.0.1:8080/ready"
        }));
    }

    // A required property left out fails with its name.
    let mut missing = minimal.clone();
    missing["brokerage"]
        .as_object_mut()
        .unwrap()
        .remove("external_url");
    let err = render("brokerage", "brokerage.yml.erb", &missing, None, dir.path()).unwrap_err();
    assert!(err.contains("brokerage.external_url"), "{err}");
    let mut missing = minimal;
    missing["brokerage"]["sso"]
        .as_object_mut()
        .unwrap()
        .remove("session_secret");
    let err = render("brokerage", "brokerage.yml.erb", &missing, None, dir.path()).unwrap_err();
    assert!(err.contains("brokerage.sso.session_secret"), "{err}");
}

/// The minimal properties of a broker whose store and backend come from the cluster links.
fn linked_props(store: &str) -> Value {
    json!({"brokerage": {
        "external_url": "https://brokerage.sys.example.com",
        "credentials": [{"username": "broker", "password": "generated-broker-password"}],
        "sso": {"session_secret": "generated-session-secret-of-48-characters-xxxxxx"},
        "listen": {"limits": {"shutdown_delay_secs": 3, "shutdown_deadline_secs": 15}},
        "store": {"kind": "mysql", "username": "root", "password": "", "database": store},
        "backends": {"mysql": {"username": "root", "password": ""}},
    }})
}

#[test]
fn a_fleet_renders_from_the_cluster_links_each_instance_its_own_node_first() {
    let dir = tempfile::tempdir().unwrap();
    // The test server is node a; nodes b and c are names that never resolve, so a rendered
    // configuration is accepted only if it reaches the server through its first node.
    let server = mysql_url();
    let (host, port) = server
        .trim_start_matches("mysql://")
        .rsplit('@')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .rsplit_once(':')
        .unwrap();
    let nodes = [host, "node-b.invalid", "node-c.invalid"];
    let cluster = json!({"port": port.parse::<u16>().unwrap(),
        "$instances": nodes.iter().map(|a| json!({"address": a})).collect::<Vec<_>>()});
    let store = format!("bkgstore_{}", uuid::Uuid::new_v4().simple());
    let props = linked_props(&store);
    for index in 0..3 {
        let links = json!({"store": cluster, "service-mysql": cluster, "$spec": {"index": index}});
        let config = render(
            "brokerage",
            "brokerage.yml.erb",
            &props,
            Some(&links),
            dir.path(),
        )
        .unwrap();
        let rendered: Value = serde_yaml::from_str(&config).unwrap();
        let hosts: Vec<String> = (0..3)
            .map(|k| format!("{}:{port}", nodes[(index + k) % 3]))
            .collect();
        assert_eq!(
            rendered["store"]["url"],
            format!("mysql://root:@{}/{store}", hosts.join(",")),
            "instance {index}: every node, its own first"
        );
        assert_eq!(
            rendered["backends"]["mysql"]["url"],
            format!("mysql://root:@{}", hosts.join(","))
        );
        assert_eq!(rendered["listen"]["shutdown_delay_secs"], 3);
        if index == 0 {
            let file = dir.path().join("linked.yml");
            std::fs::write(&file, &config).unwrap();
            let (ok, said) = check(&file, dir.path());
            assert!(ok, "{said}");
            assert!(said.contains("ok    store"), "{said}");
        }
    }

    // Credentials are URL-encoded; an explicit URL wins over the link.
    let mut odd = props.clone();
    odd["brokerage"]["store"]["password"] = json!("p@ss:w/rd");
    let links = json!({"store": cluster});
    let rendered = |props: &Value| -> Value {
        let config = render(
            "brokerage",
            "brokerage.yml.erb",
            props,
            Some(&links),
            dir.path(),
        );
        serde_yaml::from_str(&config.unwrap()).unwrap()
    };
    let rendered_odd = rendered(&odd);
    assert!(rendered_odd["store"]["url"]
        .as_str()
        .unwrap()
        .starts_with("mysql://root:p%40ss%3Aw%2Frd@"));
    assert!(
        rendered_odd["backends"]["mysql"].is_null(),
        "no backend without its link or URL"
    );
    odd["brokerage"]["store"]["url"] = json!("mysql://u:p@db.example.com:3306/s");
    let rendered_odd = rendered(&odd);
    assert_eq!(
        rendered_odd["store"]["url"],
        "mysql://u:p@db.example.com:3306/s"
    );

    // Neither a URL nor the link: the rendering fails and says what is missing.
    let err = render("brokerage", "brokerage.yml.erb", &props, None, dir.path()).unwrap_err();
    assert!(
        err.contains("brokerage.store.url or the store link"),
        "{err}"
    );
}

#[test]
fn the_errands_render_valid_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let link = json!({"brokerage": {"brokerage": {
        "external_url": "https://brokerage.sys.example.com",
        "credentials": [{"username": "broker", "password": "pa$$ 'quoted\""}]}}});
    let base =
        json!({"cf": {"api_url": "https://api.sys.example.com", "admin_password": "admin-secret"}});
    for (access, expect) in [
        (
            "all",
            "do cf enable-service-access \"$service\" -b \"$name\"; done",
        ),
        ("none", "service access left as it is"),
        ("orgs", "-o \"$org\""),
    ] {
        let mut props = base.clone();
        props["broker"] = json!({"service_access": access, "orgs": ["org-a", "org b"]});
        let script = render(
            "register-broker",
            "run.erb",
            &props,
            Some(&link),
            dir.path(),
        )
        .unwrap();
        assert!(bash_syntax_ok(&script, dir.path()), "{script}");
        assert!(
            script.contains("update-service-broker") && script.contains("create-service-broker")
        );
        assert!(script.contains(expect), "{access}: {script}");
        assert!(
            script.contains("url=https://brokerage.sys.example.com"),
            "{script}"
        );
        assert!(
            script.contains(r#"broker_password=pa\$\$\ \'quoted\""#),
            "shell-quoted: {script}"
        );
    }
    let mut bad = base.clone();
    bad["broker"] = json!({"service_access": "everyone"});
    assert!(render("register-broker", "run.erb", &bad, Some(&link), dir.path()).is_err());
    let err = render(
        "register-broker",
        "run.erb",
        &json!({"cf": {"admin_password": "admin-secret"}}),
        Some(&link),
        dir.path(),
    )
    .unwrap_err();
    assert!(err.contains("cf.api_url"), "{err}");
    let script = render("deregister-broker", "run.erb", &base, None, dir.path()).unwrap();
    assert!(bash_syntax_ok(&script, dir.path()));
    assert!(script.contains("delete-service-broker"));
}

fn job_spec(job: &str) -> serde_yaml::Value {
    serde_yaml::from_str(
        &std::fs::read_to_string(release().join(format!("jobs/{job}/spec"))).unwrap(),
    )
    .unwrap()
}

/// The links a job's spec consumes.
fn consumed(job: &str) -> BTreeSet<String> {
    job_spec(job)["consumes"]
        .as_sequence()
        .map(|links| {
            links
                .iter()
                .filter_map(|l| l["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Dotted property names a job's spec declares.
fn declared(job: &str) -> BTreeSet<String> {
    let spec = job_spec(job);
    spec["properties"]
        .as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Every property a manifest sets must be declared (a declared name, or inside one).
fn undeclared(
    prefix: &str,
    value: &serde_yaml::Value,
    declared: &BTreeSet<String>,
    out: &mut Vec<String>,
) {
    if declared.contains(prefix) {
        return;
    }
    match value.as_mapping() {
        Some(map) if !prefix.is_empty() || !map.is_empty() => {
            for (k, v) in map {
                let key = k.as_str().unwrap();
                let path = if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                };
                undeclared(&path, v, declared, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

fn check_job(job: &serde_yaml::Value, where_: &str, problems: &mut Vec<String>) {
    if job["release"] != "brokerage" {
        return;
    }
    let name = job["name"].as_str().unwrap();
    if !release().join(format!("jobs/{name}/spec")).exists() {
        problems.push(format!("{where_}: job {name} is not in the release"));
        return;
    }
    let mut missing = Vec::new();
    undeclared("", &job["properties"], &declared(name), &mut missing);
    for m in missing.into_iter().filter(|m| !m.is_empty()) {
        problems.push(format!("{where_}: {name} sets undeclared property {m}"));
    }
    for link in job["consumes"].as_mapping().into_iter().flatten() {
        let link = link.0.as_str().unwrap();
        if !consumed(name).contains(link) {
            problems.push(format!("{where_}: {name} consumes undeclared link {link}"));
        }
    }
}

#[test]
fn manifests_and_ops_files_are_v2_and_reference_only_what_the_release_has() {
    let text = std::fs::read_to_string(release().join("manifests/brokerage.yml")).unwrap();
    let manifest: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    for key in [
        "name",
        "releases",
        "stemcells",
        "update",
        "instance_groups",
        "variables",
    ] {
        assert!(!manifest[key].is_null(), "a v2 manifest has {key}");
    }
    for v1 in [
        "resource_pools",
        "networks",
        "compilation",
        "jobs",
        "disk_pools",
    ] {
        assert!(
            manifest[v1].is_null(),
            "{v1} is a v1 field current directors reject"
        );
    }
    let mut problems = Vec::new();
    let groups = manifest["instance_groups"].as_sequence().unwrap();
    for group in groups {
        let g = group["name"].as_str().unwrap();
        for key in [
            "instances",
            "vm_type",
            "stemcell",
            "networks",
            "jobs",
            "azs",
        ] {
            if group[key].is_null() {
                problems.push(format!("instance group {g} lacks {key}"));
            }
        }
        for job in group["jobs"].as_sequence().unwrap() {
            check_job(job, g, &mut problems);
        }
    }
    let brokers = groups.iter().find(|g| g["name"] == "brokerage").unwrap();
    assert_eq!(brokers["instances"], 2, "two broker instances");
    let props = &brokers["jobs"][1]["properties"]["brokerage"];
    assert_eq!(props["store"]["kind"], "mysql", "sharing a MySQL store");
    let variables: BTreeSet<String> = manifest["variables"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert!(variables.contains("broker_password"));

    assert_eq!(
        brokers["jobs"][1]["consumes"]["store"]["from"], "mysql",
        "the store's nodes come from pxc-mysql's link"
    );
    for ops in [
        "external-mysql-store.yml",
        "galera-fleet.yml",
        "route-registrar.yml",
        "tls.yml",
    ] {
        let text =
            std::fs::read_to_string(release().join("manifests/operations").join(ops)).unwrap();
        let ops_list: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        for op in ops_list.as_sequence().unwrap() {
            let kind = op["type"].as_str().unwrap();
            let path = op["path"].as_str().unwrap();
            assert!(matches!(kind, "replace" | "remove"), "{ops}: {kind}");
            assert!(path.starts_with('/'), "{ops}: {path}");
            assert_eq!(kind == "replace", !op["value"].is_null(), "{ops}: {path}");
            // Links our job consumes must be declared by it.
            let consumes = "/instance_groups/name=brokerage/jobs/name=brokerage/consumes/";
            if let Some(link) = path.strip_prefix(consumes) {
                let link = link.trim_end_matches('?');
                if !consumed("brokerage").contains(link) {
                    problems.push(format!("{ops}: undeclared link {link}"));
                }
            }
            // Properties set on our job must be declared by it.
            let prefix = "/instance_groups/name=brokerage/jobs/name=brokerage/properties/";
            if let Some(rest) = path.strip_prefix(prefix) {
                let dotted = rest.trim_end_matches('?').replace('/', ".");
                let mut missing = Vec::new();
                undeclared(&dotted, &op["value"], &declared("brokerage"), &mut missing);
                problems.extend(
                    missing
                        .into_iter()
                        .map(|m| format!("{ops}: undeclared {m}")),
                );
            }
            if path.contains("/jobs/name=")
                && path.ends_with('?')
                && !op["value"]["release"].is_null()
            {
                check_job(&op["value"], ops, &mut problems);
            }
            // Removing or replacing inside an instance group needs the group to exist.
            if let Some(rest) = path.strip_prefix("/instance_groups/name=") {
                let group = rest.split('/').next().unwrap().trim_end_matches('?');
                assert!(
                    groups.iter().any(|g| g["name"] == group),
                    "{ops}: no instance group {group}"
                );
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_cf_manifest_pushes_the_static_binary_with_health_checks() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/cf/manifest.yml"),
    )
    .unwrap();
    let manifest: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let app = &manifest["applications"][0];
    assert_eq!(app["buildpacks"][0], "binary_buildpack");
    assert_eq!(app["command"], "./brokerage serve");
    assert_eq!(app["health-check-type"], "http");
    assert_eq!(app["health-check-http-endpoint"], "/health");
    // Its environment is configuration the broker accepts.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_brokerage"));
    cmd.arg("check").current_dir(dir.path()).env_remove("PORT");
    for (k, v) in app["env"].as_mapping().unwrap() {
        let value = v
            .as_str()
            .unwrap()
            .replace("((external_url))", "https://brokerage.apps.example.com")
            .replace("((broker_password))", "pushed-broker-password")
            .replace(
                "((session_secret))",
                "pushed-session-secret-with-32-or-more-chars",
            );
        cmd.env(k.as_str().unwrap(), value);
    }
    cmd.env("BROKERAGE_BACKENDS__MYSQL__URL", mysql_url());
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn the_static_binary_runs_with_port_and_vcap_services() {
    let binary = std::env::var("BKG_TEST_STATIC_BINARY")
        .expect("BKG_TEST_STATIC_BINARY is not set: run ./scripts/test, which builds it");
    let ldd = Command::new("ldd").arg(&binary).output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    assert!(
        said.contains("not a dynamic executable") || said.contains("statically linked"),
        "{said}"
    );

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let db = format!("bkgvcap_{}", uuid::Uuid::new_v4().simple());
    // A bound MySQL service (and an unrelated one the broker must pass over).
    let vcap = json!({
        "p.redis": [{"name": "cache", "tags": ["redis"], "credentials": {"uri": "redis://127.0.0.1:1"}}],
        "p.mysql": [{"name": "brokerage-store", "tags": ["mysql"],
            "credentials": {"uri": format!("{}/{db}?reconnect=true", mysql_url())}}],
    });
    let mut child = Command::new(&binary)
        .arg("serve")
        .current_dir(dir.path())
        .env("PORT", port.to_string())
        .env("VCAP_SERVICES", vcap.to_string())
        .env("VCAP_APPLICATION", "{}")
        .env("BROKERAGE_BACKENDS__MYSQL__URL", mysql_url())
        .env(
            "BROKERAGE_AUTH__CREDENTIALS",
            format!("[{{username=\"{USER}\", password=\"{PASSWORD}\"}}]"),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = TestClient::new(format!("http://127.0.0.1:{port}"));
    wait_healthy(&client.client, &client.base).await;
    let catalog = client.call(Method::GET, "/v2/catalog", None).await;
    let service = &catalog.body["services"][0];
    let id = unique("static");
    client
        .call(
            Method::PUT,
            &format!("/v2/service_instances/{id}"),
            Some(provision_body(
                service["id"].as_str().unwrap(),
                service["plans"][0]["id"].as_str().unwrap(),
            )),
        )
        .await
        .expect(201);
    // The record went to the store VCAP_SERVICES named.
    let mut conn = admin().await;
    use mysql_async::prelude::Queryable;
    let count: Option<i64> = conn
        .query_first(format!("SELECT COUNT(*) FROM `{db}`.brokerage_instances"))
        .await
        .unwrap();
    assert_eq!(count, Some(1));
    client
        .call(
            Method::DELETE,
            &format!(
                "/v2/service_instances/{id}?service_id={}&plan_id={}",
                service["id"].as_str().unwrap(),
                service["plans"][0]["id"].as_str().unwrap()
            ),
            None,
        )
        .await
        .expect(200);
    let _ = child.kill();
    let _ = child.wait();
}
