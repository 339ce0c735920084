//! The CUBRID service against a STAND-IN: no CUBRID server exists in any registry these
//! machines reach, so `tests/fixtures/cubrid_standin.py` plays `cubrid` and `csql`. It
//! records the commands the broker runs and keeps enough state to check logins; it does not
//! run SQL. These tests show which commands the broker builds and in what order, that they
//! need no shell, and how failures are rolled back, not that CUBRID itself accepts them.

use std::path::PathBuf;
use std::process::Command;

use brokerage::backend::cubrid::cubrid_database_name;
use brokerage::backend::user_name;
use reqwest::Method;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::helpers::*;

const CUBRID_SERVICE: &str = "svc-cubrid-test";
const CUBRID_PLAN: &str = "plan-cubrid-100";

/// A stand-in installation: bin/cubrid and bin/csql, a databases directory, the log.
/// The stand-in for CUBRID's tools (CUBRID cannot run here): records every command.
pub(crate) struct StandIn {
    dir: TempDir,
}

impl StandIn {
    pub(crate) fn new() -> StandIn {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(dir.path().join("databases")).unwrap();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/cubrid_standin.py"
        );
        for tool in ["cubrid", "csql"] {
            std::os::unix::fs::symlink(script, bin.join(tool)).unwrap();
        }
        StandIn { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The `backends.cubrid` entry; with `missing`, its tools are not installed.
    pub(crate) fn entry(&self, missing: bool) -> String {
        let bin = if missing { "missing" } else { "bin" };
        format!(
            "cubrid: {{cubrid: {:?}, csql: {:?}, databases_dir: {:?}, public_host: cubrid.example.test, \
             public_port: 33000, dba_password: dbaSecret123, timeout_secs: 20}}",
            self.path(&format!("{bin}/cubrid")).display().to_string(),
            self.path(&format!("{bin}/csql")).display().to_string(),
            self.path("databases").display().to_string(),
        )
    }

    fn config(&self) -> TestConfig {
        TestConfig::new().with_backend(
            self.entry(false),
            vec![format!(
                "{{id: {CUBRID_SERVICE}, name: cubrid-test, backend: cubrid, description: CUBRID for tests, \
                 bindable: true, instances_retrievable: true, bindings_retrievable: true, \
                 plans: [{{id: {CUBRID_PLAN}, name: small, description: 100 MB, max_storage_mb: 100}}]}}"
            )],
        )
    }

    /// Every command recorded so far.
    fn commands(&self) -> Vec<Value> {
        std::fs::read_to_string(self.path("commands.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn fail_on(&self, needle: &str) {
        std::fs::write(self.path("fail"), needle).unwrap();
    }

    /// Logs in with csql exactly as the credentials say, as an app's tooling would.
    fn login(&self, creds: &Value, database: &str) -> bool {
        Command::new(self.path("bin/csql"))
            .args(["-u", creds["username"].as_str().unwrap()])
            .args(["-p", creds["password"].as_str().unwrap()])
            .arg(format!("{database}@localhost"))
            .args(["-c", "SELECT 1"])
            .output()
            .unwrap()
            .status
            .success()
    }
}

fn argv(entry: &Value) -> Vec<&str> {
    entry["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn stand_in_commands_run_without_a_shell_and_credentials_work_only_for_their_database() {
    let cubrid = StandIn::new();
    let app = spawn_with(cubrid.config()).await;
    // An id a shell would read as an option: names are derived, so it never reaches argv.
    let (a, b) = ("-rf..cubrid-a".to_string(), unique("cubrid-b"));
    let creds_a = app
        .provision_and_bind(&a, CUBRID_SERVICE, CUBRID_PLAN)
        .await;
    let creds_b = app
        .provision_and_bind(&b, CUBRID_SERVICE, CUBRID_PLAN)
        .await;
    let (db_a, db_b) = (cubrid_database_name(&a), cubrid_database_name(&b));
    let dir_a = cubrid.path(&format!("databases/{db_a}"));

    let log = cubrid.commands();
    let dir_arg = dir_a.display().to_string();
    assert_eq!(
        argv(&log[0]),
        [
            "createdb",
            "--db-volume-size=100M",
            "--log-volume-size=25M",
            "-F",
            &dir_arg,
            "-L",
            &dir_arg,
            &db_a,
            "en_US.utf8"
        ]
    );
    assert_eq!(argv(&log[1]), ["server", "start", db_a.as_str()]);
    assert_eq!(log[2]["tool"], "csql");
    assert_eq!(log[2]["sql"], "ALTER USER dba PASSWORD 'dbaSecret123';\n");
    let user_a = user_name(&format!("{a}-b"));
    let create = log
        .iter()
        .find(|e| {
            e["sql"]
                .as_str()
                .is_some_and(|s| s.starts_with(&format!("CREATE USER {user_a}")))
        })
        .expect("bind creates the user");
    assert!(
        !argv(create)
            .iter()
            .any(|a| a.contains(creds_a["password"].as_str().unwrap())),
        "the binding's password is never on a command line"
    );
    for entry in &log {
        for arg in argv(entry) {
            assert!(
                !arg.contains("-rf..cubrid-a"),
                "the raw id reached argv: {entry}"
            );
        }
    }

    assert_eq!(
        creds_a["jdbcUrl"],
        format!("jdbc:cubrid:cubrid.example.test:33000:{db_a}:::")
    );
    assert_eq!(creds_a["name"], db_a);
    assert_eq!(creds_a["username"], user_a);
    assert_eq!(
        creds_a["uri"],
        format!(
            "cubrid://{user_a}:{}@cubrid.example.test:33000/{db_a}",
            creds_a["password"].as_str().unwrap()
        )
    );

    // The credentials log in to their own database only.
    assert!(cubrid.login(&creds_a, &db_a));
    assert!(
        !cubrid.login(&creds_a, &db_b),
        "no access to another instance"
    );
    assert!(cubrid.login(&creds_b, &db_b));

    // Unbind drops the user: the credentials stop working.
    app.unbind_from(&a, &format!("{a}-b"), CUBRID_SERVICE, CUBRID_PLAN)
        .await
        .expect(200);
    assert!(!cubrid.login(&creds_a, &db_a));
    assert!(cubrid.login(&creds_b, &db_b));

    // Deprovision stops and deletes the database and removes its directory.
    let before = cubrid.commands().len();
    app.deprovision(&a, CUBRID_SERVICE, CUBRID_PLAN)
        .await
        .expect(200);
    let tail: Vec<Vec<String>> = cubrid.commands()[before..]
        .iter()
        .map(|e| argv(e).iter().map(|s| s.to_string()).collect())
        .collect();
    assert_eq!(
        tail,
        [
            vec!["server".to_string(), "stop".into(), db_a.clone()],
            vec!["deletedb".to_string(), db_a.clone()]
        ]
    );
    assert!(!dir_a.exists(), "the directory is gone");
    app.deprovision(&a, CUBRID_SERVICE, CUBRID_PLAN)
        .await
        .expect(410);
    app.unbind_from(&b, &format!("{b}-b"), CUBRID_SERVICE, CUBRID_PLAN)
        .await
        .expect(200);
    app.deprovision(&b, CUBRID_SERVICE, CUBRID_PLAN)
        .await
        .expect(200);
}

#[tokio::test]
async fn stand_in_a_server_that_will_not_start_leaves_no_database_and_no_record() {
    let cubrid = StandIn::new();
    let app = spawn_with(cubrid.config()).await;
    let id = unique("cubrid-half");
    let db = cubrid_database_name(&id);
    cubrid.fail_on("server start");
    let answer = app
        .provision_with(&id, provision_body(CUBRID_SERVICE, CUBRID_PLAN), false)
        .await;
    assert_eq!(answer.status, 500, "{}", answer.body);
    app.call(Method::GET, &format!("/v2/service_instances/{id}"), None)
        .await
        .expect_error(404, None);
    // createdb ran, the start failed, and the half-made database was deleted again.
    let tools: Vec<String> = cubrid
        .commands()
        .iter()
        .map(|e| argv(e).join(" "))
        .collect();
    assert!(tools.iter().any(|c| c.starts_with("createdb")), "{tools:?}");
    assert!(tools.contains(&format!("deletedb {db}")), "{tools:?}");
    assert!(!cubrid.path(&format!("databases/{db}")).exists());

    // Once the server starts again, the same provision succeeds.
    std::fs::remove_file(cubrid.path("fail")).unwrap();
    app.provision_with(&id, provision_body(CUBRID_SERVICE, CUBRID_PLAN), false)
        .await
        .expect(201);
    app.deprovision(&id, CUBRID_SERVICE, CUBRID_PLAN)
        .await
        .expect(200);
}

#[tokio::test]
async fn stand_in_a_failed_create_user_leaves_no_binding() {
    let cubrid = StandIn::new();
    let app = spawn_with(cubrid.config()).await;
    let id = unique("cubrid-bind");
    app.provision_with(&id, provision_body(CUBRID_SERVICE, CUBRID_PLAN), false)
        .await
        .expect(201);
    cubrid.fail_on("-i");
    let answer = app
        .bind_with(
            &id,
            "b1",
            json!({"service_id": CUBRID_SERVICE, "plan_id": CUBRID_PLAN}),
            false,
        )
        .await;
    assert_eq!(answer.status, 500, "{}", answer.body);
    app.call(
        Method::GET,
        &format!("/v2/service_instances/{id}/service_bindings/b1"),
        None,
    )
    .await
    .expect_error(404, None);
    std::fs::remove_file(cubrid.path("fail")).unwrap();
    app.deprovision(&id, CUBRID_SERVICE, CUBRID_PLAN)
        .await
        .expect(200);
}
