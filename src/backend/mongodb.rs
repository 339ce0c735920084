//! The MongoDB backend (seed section 4.3): a database per instance, a user per binding
//! with `readWrite` on that database only.
//!
//! Names are the MySQL backend's: `cf_<id>` (or a hash) for the database, a hash of the
//! binding id for the user, which lives in the instance's own database so that dropping the
//! database can leave no user behind.

use async_trait::async_trait;
use mongodb::bson::{doc, Document};
use mongodb::error::{Error as MongoError, ErrorKind};
use mongodb::options::ClientOptions;
use mongodb::Client;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::json;
use tokio::sync::OnceCell;
use tracing::instrument;

use super::{
    database_name, object, scrub, user_name, Backend, BackendError, Binding, Bound, Endpoint,
    Unbinding,
};
use crate::catalog::PlanLimits;
use crate::config::ServerBackendConfig;

/// The collection provision creates: MongoDB keeps a database only while it holds one.
const MARKER: &str = "brokerage_instance";

/// MongoDB's "user not found" code.
const USER_NOT_FOUND: i32 = 11;

pub struct MongodbBackend {
    url: String,
    client: OnceCell<Client>,
    at: Endpoint,
}

impl MongodbBackend {
    pub fn new(config: &ServerBackendConfig) -> anyhow::Result<Self> {
        if config.ca_certificate.is_some() {
            anyhow::bail!(
                "backends.mongodb.ca_certificate: MongoDB takes TLS from its url \
                 (?tls=true&tlsCAFile=/path/to/ca.pem)"
            );
        }
        Ok(MongodbBackend {
            at: Endpoint::from_config("backends.mongodb.url", config, "mongodb", 27017)?,
            url: config.url.expose().to_string(),
            client: OnceCell::new(),
        })
    }

    /// The admin client, built on first use (building it needs no server).
    async fn client(&self) -> Result<&Client, BackendError> {
        self.client
            .get_or_try_init(|| async {
                let mut options = ClientOptions::parse(&self.url)
                    .await
                    .map_err(|e| self.error(e))?;
                options.server_selection_timeout = Some(self.at.timeout);
                options.connect_timeout = Some(self.at.timeout);
                options.app_name = Some("brokerage".into());
                Client::with_options(options).map_err(|e| self.error(e))
            })
            .await
    }

    fn error(&self, e: MongoError) -> BackendError {
        match *e.kind {
            ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. } => BackendError::unavailable(
                "the MongoDB server is unreachable",
                format!("{}: {e}", self.at.admin_address),
            ),
            _ => BackendError::Failed(format!("MongoDB server at {}: {e}", self.at.admin_address)),
        }
    }

    async fn command(&self, db: &str, command: Document) -> Result<Document, BackendError> {
        let client = self.client().await?;
        client
            .database(db)
            .run_command(command)
            .await
            .map_err(|e| self.error(e))
    }

    async fn database_exists(&self, db: &str) -> Result<bool, BackendError> {
        let names = self
            .client()
            .await?
            .list_database_names()
            .filter(doc! {"name": db})
            .await
            .map_err(|e| self.error(e))?;
        Ok(names.iter().any(|n| n == db))
    }

    async fn drop_user(&self, db: &str, user: &str) -> Result<(), BackendError> {
        let client = self.client().await?;
        match client
            .database(db)
            .run_command(doc! {"dropUser": user})
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if command_code(&e) == Some(USER_NOT_FOUND) => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }

    async fn data_bytes(&self, db: &str) -> Result<u64, BackendError> {
        let stats = self.command(db, doc! {"dbStats": 1}).await?;
        let size = ["dataSize", "indexSize"]
            .iter()
            .filter_map(|k| stats.get(*k))
            .map(|v| match v {
                mongodb::bson::Bson::Int32(n) => *n as u64,
                mongodb::bson::Bson::Int64(n) => *n as u64,
                mongodb::bson::Bson::Double(n) => *n as u64,
                _ => 0,
            })
            .sum();
        Ok(size)
    }
}

fn command_code(e: &MongoError) -> Option<i32> {
    match &*e.kind {
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

#[async_trait]
impl Backend for MongodbBackend {
    fn describe(&self) -> String {
        format!("mongodb backend at {}", self.at.admin_address)
    }

    async fn check(&self) -> Result<(), BackendError> {
        self.command("admin", doc! {"ping": 1}).await.map(|_| ())
    }

    #[instrument(skip(self), fields(backend = "mongodb"))]
    async fn provision(&self, instance_id: &str, _limits: PlanLimits) -> Result<(), BackendError> {
        let db = database_name(instance_id);
        if self.database_exists(&db).await? {
            return Err(BackendError::Conflict(format!(
                "database {db} already exists on the MongoDB server; Brokerage has no record of it"
            )));
        }
        self.command(&db, doc! {"create": MARKER}).await.map(|_| ())
    }

    async fn usage_bytes(&self, instance_id: &str) -> Result<Option<u64>, BackendError> {
        Ok(Some(self.data_bytes(&database_name(instance_id)).await?))
    }

    #[instrument(skip(self), fields(backend = "mongodb"))]
    async fn deprovision(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<(), BackendError> {
        let db = database_name(instance_id);
        self.command(&db, doc! {"dropAllUsersFromDatabase": 1})
            .await?;
        self.command(&db, doc! {"dropDatabase": 1})
            .await
            .map(|_| ())
    }

    #[instrument(skip(self, binding), fields(backend = "mongodb"))]
    async fn bind(&self, binding: &Binding<'_>) -> Result<Bound, BackendError> {
        let Binding {
            instance_id,
            binding_id,
            ..
        } = *binding;
        let db = database_name(instance_id);
        let user = user_name(binding_id);
        let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
        if !self.database_exists(&db).await? {
            return Err(BackendError::Failed(format!(
                "database {db} is missing on the MongoDB server"
            )));
        }
        // A user left by an interrupted bind of this same binding is replaced.
        self.drop_user(&db, &user).await?;
        self.command(
            &db,
            doc! {
                "createUser": &user,
                "pwd": &password,
                "roles": [{"role": "readWrite", "db": &db}],
            },
        )
        .await
        .map_err(|e| scrub(e, &password))?;
        let (host, port) = (&self.at.public_host, self.at.public_port);
        let credentials = json!({
            "uri": format!("mongodb://{user}:{password}@{host}:{port}/{db}?authSource={db}"),
            "host": host,
            "port": port,
            "database": db,
            "username": user,
            "password": password,
        });
        object(credentials).map(Bound::from)
    }

    #[instrument(skip(self), fields(backend = "mongodb"))]
    async fn unbind(&self, binding: &Unbinding<'_>) -> Result<(), BackendError> {
        let Unbinding {
            instance_id,
            binding_id,
            ..
        } = *binding;
        self.drop_user(&database_name(instance_id), &user_name(binding_id))
            .await
    }

    async fn describe_instance(
        &self,
        instance_id: &str,
        _limits: PlanLimits,
    ) -> Result<Vec<(String, String)>, BackendError> {
        Ok(vec![("Database".into(), database_name(instance_id))])
    }
}
