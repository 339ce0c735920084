//! The CUBRID backend (seed section 4.1): a database per instance, made and run with
//! CUBRID's own tools on the broker's host, and a database user per binding.
//!
//! - provision: `cubrid createdb` (volume sizes from the plan) in a directory of its own,
//!   `cubrid server start`, then `csql` sets the dba password;
//! - bind / unbind: `csql` as dba runs `CREATE USER` / `DROP USER`;
//! - deprovision: `cubrid server stop`, `cubrid deletedb`, and the directory goes.
//!
//! No shell is involved: every program gets its arguments as a vector, and every name in
//! them is derived (hex digits), never taken from a request. SQL reaches `csql` in a file
//! only the broker's user can read, so binding passwords never show in the process list;
//! the dba password does, for the length of a `csql` call, as `-p` is how csql takes it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::instrument;

use super::{object, scrub, user_name, Backend, BackendError, Binding, Bound, Unbinding};
use crate::catalog::PlanLimits;
use crate::config::{CubridBackendConfig, Secret};

pub struct CubridBackend {
    cubrid: PathBuf,
    csql: PathBuf,
    databases_dir: PathBuf,
    public_host: String,
    public_port: u16,
    dba_password: Secret,
    timeout: Duration,
}

/// The database an instance owns: CUBRID allows short names only.
pub fn cubrid_database_name(instance_id: &str) -> String {
    format!("cf{}", &hex::encode(Sha256::digest(instance_id))[..15])
}

/// The log volume for a plan's storage: a quarter of it, within 20 MB and 512 MB.
fn log_volume_mb(max_storage_mb: u64) -> u64 {
    (max_storage_mb / 4).clamp(20, 512)
}

impl CubridBackend {
    pub fn new(config: &CubridBackendConfig) -> anyhow::Result<Self> {
        if config.dba_password.expose().len() < 8
            || !config
                .dba_password
                .expose()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        {
            anyhow::bail!("backends.cubrid.dba_password: at least 8 letters and digits");
        }
        if !config.databases_dir.is_absolute() {
            anyhow::bail!("backends.cubrid.databases_dir: must be an absolute path");
        }
        Ok(CubridBackend {
            cubrid: config.cubrid.clone(),
            csql: config.csql.clone(),
            databases_dir: config.databases_dir.clone(),
            public_host: config.public_host.clone(),
            public_port: config.public_port,
            dba_password: config.dba_password.clone(),
            timeout: Duration::from_secs(config.timeout_secs.max(1)),
        })
    }

    fn directory(&self, db: &str) -> PathBuf {
        self.databases_dir.join(db)
    }

    /// Runs a program with its arguments, failing with what it printed.
    async fn run(&self, program: &Path, args: &[&str]) -> Result<(), BackendError> {
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let what = format!("{name} {}", args.first().copied().unwrap_or_default());
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                BackendError::unavailable(
                    "CUBRID's tools cannot be run",
                    format!("{}: {e}", program.display()),
                )
            })?;
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                BackendError::unavailable(
                    format!("CUBRID's {what} did not finish within {:?}", self.timeout),
                    "timeout",
                )
            })?
            .map_err(|e| BackendError::Failed(format!("CUBRID's {what}: {e}")))?;
        if output.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let said = if said.is_empty() {
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        } else {
            said
        };
        Err(BackendError::Failed(format!(
            "CUBRID's {what} failed ({}): {said}",
            output.status
        )))
    }

    /// Runs SQL as dba on a database, from a file only the broker can read.
    async fn sql(&self, db: &str, dba_password: &str, sql: &str) -> Result<(), BackendError> {
        use std::io::Write;
        let mut file = tempfile::Builder::new()
            .prefix("brokerage-csql-")
            .suffix(".sql")
            .tempfile()
            .map_err(|e| BackendError::Failed(format!("cannot write SQL for csql: {e}")))?;
        file.write_all(sql.as_bytes())
            .map_err(|e| BackendError::Failed(format!("cannot write SQL for csql: {e}")))?;
        let path = file.path().to_string_lossy().into_owned();
        let target = format!("{db}@localhost");
        let mut args = vec!["-u", "dba"];
        if !dba_password.is_empty() {
            args.extend(["-p", dba_password]);
        }
        args.extend([target.as_str(), "-i", path.as_str()]);
        self.run(&self.csql, &args)
            .await
            .map_err(|e| scrub(e, dba_password))
    }

    /// Stops and deletes a database and removes its directory; done if already gone.
    async fn remove(&self, db: &str) -> Result<(), BackendError> {
        let dir = self.directory(db);
        if !dir.exists() {
            return Ok(());
        }
        // Not running is fine: it may have stopped, or never started.
        let _ = self.run(&self.cubrid, &["server", "stop", db]).await;
        if dir.join(db).exists() {
            self.run(&self.cubrid, &["deletedb", db]).await?;
        }
        tokio::fs::remove_dir_all(&dir)
            .await
            .map_err(|e| BackendError::Failed(format!("cannot remove {}: {e}", dir.display())))
    }

    async fn create(&self, db: &str, limits: PlanLimits) -> Result<(), BackendError> {
        let dir = self.directory(db);
        let dir_arg = dir.to_string_lossy().into_owned();
        let db_volume = format!("--db-volume-size={}M", limits.max_storage_mb);
        let log_volume = format!(
            "--log-volume-size={}M",
            log_volume_mb(limits.max_storage_mb)
        );
        self.run(
            &self.cubrid,
            &[
                "createdb",
                &db_volume,
                &log_volume,
                "-F",
                &dir_arg,
                "-L",
                &dir_arg,
                db,
                "en_US.utf8",
            ],
        )
        .await?;
        self.run(&self.cubrid, &["server", "start", db]).await?;
        // A new database's dba has no password.
        self.sql(
            db,
            "",
            &format!(
                "ALTER USER dba PASSWORD '{}';\n",
                self.dba_password.expose()
            ),
        )
        .await
        .map_err(|e| scrub(e, self.dba_password.expose()))
    }
}

#[async_trait]
impl Backend for CubridBackend {
    fn describe(&self) -> String {
        format!(
            "cubrid backend with databases in {}",
            self.databases_dir.display()
        )
    }

    async fn check(&self) -> Result<(), BackendError> {
        for program in [&self.cubrid, &self.csql] {
            if !program.is_file() {
                return Err(BackendError::unavailable(
                    "CUBRID's tools are not installed",
                    program.display(),
                ));
            }
        }
        if !self.databases_dir.is_dir() {
            return Err(BackendError::unavailable(
                "CUBRID's databases directory is missing",
                self.databases_dir.display(),
            ));
        }
        Ok(())
    }

    #[instrument(skip(self), fields(backend = "cubrid"))]
    async fn provision(&self, instance_id: &str, limits: PlanLimits) -> Result<(), BackendError> {
        self.check().await?;
        let db = cubrid_database_name(instance_id);
        let dir = self.directory(&db);
        match tokio::fs::create_dir(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(BackendError::Conflict(format!(
                    "CUBRID database directory {} already exists; Brokerage has no record of it",
                    dir.display()
                )))
            }
            Err(e) => {
                return Err(BackendError::Failed(format!(
                    "cannot create {}: {e}",
                    dir.display()
                )))
            }
        }
        if let Err(e) = self.create(&db, limits).await {
            // Half a database is no database: take back whatever was made.
            self.remove(&db).await?;
            return Err(e);
        }
        Ok(())
    }

    async fn update(
        &self,
        _instance_id: &str,
        from: PlanLimits,
        to: PlanLimits,
    ) -> Result<(), BackendError> {
        if to.max_storage_mb != from.max_storage_mb {
            return Err(BackendError::Rejected(
                "a CUBRID database keeps the volume sizes it was created with; \
                 create a new instance on the other plan and move the data"
                    .into(),
            ));
        }
        Ok(())
    }

    #[instrument(skip(self), fields(backend = "cubrid"))]
    async fn deprovision(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<(), BackendError> {
        self.remove(&cubrid_database_name(instance_id)).await
    }

    #[instrument(skip(self, binding), fields(backend = "cubrid"))]
    async fn bind(&self, binding: &Binding<'_>) -> Result<Bound, BackendError> {
        let Binding {
            instance_id,
            binding_id,
            ..
        } = *binding;
        let db = cubrid_database_name(instance_id);
        let user = user_name(binding_id);
        let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
        if !self.directory(&db).exists() {
            return Err(BackendError::Failed(format!(
                "CUBRID database {db} is missing"
            )));
        }
        // A user left by an interrupted bind of this same binding is replaced.
        let _ = self
            .sql(
                &db,
                self.dba_password.expose(),
                &format!("DROP USER {user};\n"),
            )
            .await;
        self.sql(
            &db,
            self.dba_password.expose(),
            &format!("CREATE USER {user} PASSWORD '{password}';\n"),
        )
        .await
        .map_err(|e| scrub(e, &password))?;
        let (host, port) = (&self.public_host, self.public_port);
        object(json!({
            "hostname": host,
            "port": port,
            "name": db,
            "username": user,
            "password": password,
            "uri": format!("cubrid://{user}:{password}@{host}:{port}/{db}"),
            "jdbcUrl": format!("jdbc:cubrid:{host}:{port}:{db}:::"),
        }))
        .map(Bound::from)
    }

    #[instrument(skip(self), fields(backend = "cubrid"))]
    async fn unbind(&self, binding: &Unbinding<'_>) -> Result<(), BackendError> {
        let Unbinding {
            instance_id,
            binding_id,
            ..
        } = *binding;
        let db = cubrid_database_name(instance_id);
        if !self.directory(&db).exists() {
            return Ok(());
        }
        let user = user_name(binding_id);
        match self
            .sql(
                &db,
                self.dba_password.expose(),
                &format!("DROP USER {user};\n"),
            )
            .await
        {
            Ok(()) => Ok(()),
            // Gone already (an earlier unbind that was not recorded).
            Err(BackendError::Failed(m)) if m.contains("does not exist") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn describe_instance(
        &self,
        instance_id: &str,
        limits: PlanLimits,
    ) -> Result<Vec<(String, String)>, BackendError> {
        Ok(vec![
            ("Database".into(), cubrid_database_name(instance_id)),
            (
                "Volumes".into(),
                format!(
                    "{} MB data, {} MB log",
                    limits.max_storage_mb,
                    log_volume_mb(limits.max_storage_mb)
                ),
            ),
        ])
    }
}
