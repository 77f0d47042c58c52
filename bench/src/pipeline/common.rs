//! What the benches share: the throw-away Postgres database, pets to order, and a
//! histogram's quantiles in milliseconds.

use anyhow::Context as _;
use hdrhistogram::Histogram;
use petstore_domain::pet::{Pet, PetCommand, PetDetails};
use petstore_domain::{Money, PetCategory, PetId};
use petstore_event_store::store::{EventMetadata, EventStore};
use petstore_settings::{LogFormat, Settings};
use petstore_web::CorrelationId;
use secrecy::SecretString;
use sqlx::{Connection as _, PgConnection};

pub(crate) struct BenchDatabase {
    admin_url: String,
    name: String,
    pub(crate) url: String,
}

impl BenchDatabase {
    pub(crate) async fn create(admin_url: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            admin_url.contains("@127.0.0.1") || admin_url.contains("@localhost"),
            "the bench only runs against a loopback Postgres"
        );
        let name = format!("petstore_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(admin_url)
            .await
            .context("connect to Postgres")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url, |(base, _)| base);
        Ok(Self {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }

    pub(crate) async fn drop(self) -> anyhow::Result<()> {
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }

    pub(crate) fn settings(&self) -> Settings {
        let mut settings = Settings::default();
        settings.http.listen = ([127, 0, 0, 1], 0).into();
        settings.log.format = LogFormat::Text;
        settings.log.filter = "warn".to_owned();
        settings.database.url = Some(SecretString::from(self.url.clone()));
        settings.database.max_connections = 32;
        settings.projector.poll_interval_ms = 50;
        // Demo mode, no rate limits: this bench measures the saga pipeline, not auth.
        settings.security.authentication_required = false;
        settings.security.rate_limits.enabled = false;
        settings
    }
}

pub(crate) fn millis(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

pub(crate) async fn add_pets(store: &EventStore, count: usize) -> anyhow::Result<Vec<String>> {
    let metadata = EventMetadata::new(CorrelationId::generate(), "bench");
    let mut pets = Vec::with_capacity(count);
    for index in 0..count {
        let pet_id = format!("bench-pet-{index:06}");
        let details = PetDetails {
            pet_id: PetId::parse(&pet_id)?,
            name: format!("Bench {index}"),
            category: PetCategory::Fish,
            breed: "Guppy".to_owned(),
            age_months: 1,
            vaccinated: false,
            price: Money::usd(1_000)?,
            description: "bench".to_owned(),
        };
        store
            .execute::<Pet>(&pet_id, PetCommand::AddPet(details), &(), &metadata)
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        pets.push(pet_id);
    }
    Ok(pets)
}
