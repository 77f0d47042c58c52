//! Redis, for read models and cached query results.
//!
//! Every read and write goes through the `redis` resilience policy (breaker, bulkhead,
//! overall timeout), and each command has a short timeout of its own inside it: a slow or
//! unreachable Redis turns into an error the caller handles (queries fall back to the
//! read-model database) instead of a slow service, and while its breaker is open no call
//! waits for it at all. The health ping and the bulk moves of a replay or a start-up (which
//! take their own, longer timeouts) are made directly. The connection manager reconnects on
//! its own once Redis is back. Keys are namespaced by a configurable prefix.

use std::time::Duration;

use std::future::Future;
use std::sync::{Arc, LazyLock};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, RetryMethod};
use secrecy::{ExposeSecret, SecretString};

use petstore_resilience::{AttemptFailure, CallError, Policy, Rejection};
use petstore_settings::RedisSettings;

/// Redis failed or answered too slowly.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Redis is not configured.
    #[error("redis.url is not set")]
    NotConfigured,
    /// The client or server failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The call took longer than the operation timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The `redis` policy made no call (its breaker is open, its bulkhead full).
    #[error("redis is not called now: {0}")]
    Rejected(Rejection),
    /// The writer's lock passed to another holder: its write was refused.
    #[error("fenced: the views are written with token {current} now, not this writer's {held}")]
    Fenced {
        /// The writer's token.
        held: i64,
        /// The token the views accept now.
        current: i64,
    },
}

impl CacheError {
    /// Whether the write was refused because the writer's lock passed to another holder.
    pub fn is_fenced(&self) -> bool {
        matches!(self, CacheError::Fenced { .. })
    }

    /// Whether Redis failed (counted by its breaker), rather than answering for good (a
    /// refused fenced write, a script or type error).
    fn is_failure(&self) -> bool {
        match self {
            CacheError::Redis(error) => !matches!(error.retry_method(), RetryMethod::NoRetry),
            CacheError::Timeout(_) => true,
            CacheError::NotConfigured | CacheError::Rejected(_) | CacheError::Fenced { .. } => {
                false
            }
        }
    }
}

impl From<CallError<CacheError>> for CacheError {
    fn from(error: CallError<CacheError>) -> Self {
        match error {
            CallError::Refused(error)
            | CallError::Failed {
                failure: AttemptFailure::Error(error),
                ..
            } => error,
            CallError::Failed {
                failure: AttemptFailure::TimedOut(after),
                ..
            } => CacheError::Timeout(after),
            CallError::Rejected(rejection) => CacheError::Rejected(rejection),
        }
    }
}

/// Raises the fence key `KEYS[1]` to token `ARGV[1]` unless it is already above it; answers
/// the token in force.
static RAISE_FENCE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local mine = tonumber(ARGV[1])
if current < mine then
  redis.call('SET', KEYS[1], ARGV[1])
  return mine
end
return current
",
    )
});

/// Writes `ARGV[2]` values to `KEYS[2..]` and increments the rest of `KEYS`, all or nothing,
/// only while the fence key `KEYS[1]` holds token `ARGV[1]`; answers the token in force.
static FENCED_WRITE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then
  return current
end
local values = tonumber(ARGV[2])
for i = 1, values do
  redis.call('SET', KEYS[i + 1], ARGV[i + 2])
end
for i = values + 2, #KEYS do
  redis.call('INCR', KEYS[i])
end
return current
",
    )
});

/// A Redis connection with a key prefix, an operation timeout and a resilience policy.
#[derive(Clone)]
pub struct Cache {
    connection: ConnectionManager,
    prefix: String,
    timeout: Duration,
    policy: Policy,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Cache")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// A lazily connecting client calling through `policy` (the `redis` one): the service
    /// starts even when Redis is down.
    pub fn connect(settings: &RedisSettings, policy: Policy) -> Result<Self, CacheError> {
        let url: &SecretString = settings.url.as_ref().ok_or(CacheError::NotConfigured)?;
        let client = redis::Client::open(url.expose_secret())?;
        let timeout = Duration::from_millis(settings.operation_timeout_ms.max(1));
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            connection,
            prefix: settings.key_prefix.clone(),
            timeout,
            policy,
        })
    }

    /// The same connection under another key prefix.
    pub fn with_prefix(&self, prefix: &str) -> Self {
        Self {
            connection: self.connection.clone(),
            prefix: prefix.to_owned(),
            timeout: self.timeout,
            policy: self.policy.clone(),
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every key matching `pattern` (SCAN, so Redis is never blocked).
    async fn scan(&self, pattern: &str) -> Result<Vec<String>, CacheError> {
        let mut connection = self.connection.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .bounded(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut connection),
                )
                .await?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// Moves every key under `{from}:` to the same suffix under this cache's prefix, deletes
    /// this cache's keys matching `replaced` (suffix patterns such as `order:*`) that the
    /// move does not overwrite, and increments the counters `incremented` (suffixes; their
    /// copies under `{from}:` are dropped, not moved), all in one MULTI/EXEC: readers see the
    /// old set of keys or the new one, never a mix. Returns how many keys moved.
    pub async fn adopt_namespace(
        &self,
        from: &str,
        replaced: &[&str],
        incremented: &[&str],
    ) -> Result<usize, CacheError> {
        // SCAN may return a key twice: a set, so no RENAME runs on a key already moved.
        let shadow: std::collections::BTreeSet<String> =
            self.scan(&format!("{from}:*")).await?.into_iter().collect();
        let (dropped, moving): (Vec<&String>, Vec<&String>) = shadow
            .iter()
            .partition(|key| incremented.contains(&&key[from.len() + 1..]));
        let targets: std::collections::HashSet<String> = moving
            .iter()
            .map(|key| self.key(&key[from.len() + 1..]))
            .collect();
        let mut stale = std::collections::BTreeSet::new();
        for pattern in replaced {
            stale.extend(
                self.scan(&self.key(pattern))
                    .await?
                    .into_iter()
                    .filter(|key| !targets.contains(key)),
            );
        }
        let mut pipeline = redis::pipe();
        pipeline.atomic();
        for key in stale.iter().chain(dropped) {
            pipeline.del(key).ignore();
        }
        for key in &moving {
            pipeline
                .rename(*key, self.key(&key[from.len() + 1..]))
                .ignore();
        }
        for counter in incremented {
            pipeline.incr(self.key(counter), 1).ignore();
        }
        let mut connection = self.connection.clone();
        let timeout = self.timeout * 20;
        match tokio::time::timeout(timeout, pipeline.query_async::<()>(&mut connection)).await {
            Ok(result) => result?,
            Err(_) => return Err(CacheError::Timeout(timeout)),
        }
        Ok(moving.len())
    }

    /// Deletes every key under `{prefix}:` (a namespace left by an interrupted replay).
    pub async fn delete_namespace(&self, prefix: &str) -> Result<usize, CacheError> {
        let keys = self.scan(&format!("{prefix}:*")).await?;
        let mut connection = self.connection.clone();
        for chunk in keys.chunks(1000) {
            self.bounded(
                redis::cmd("DEL")
                    .arg(chunk)
                    .query_async::<usize>(&mut connection),
            )
            .await?;
        }
        Ok(keys.len())
    }

    /// Sets `key` to `value`, with no expiry.
    pub async fn set(&self, key: &str, value: &str) -> Result<(), CacheError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.call(self.timeout, move |mut connection| {
            let (key, value) = (key.clone(), value.clone());
            async move { connection.set::<_, _, ()>(key, value).await }
        })
        .await
    }

    /// `{prefix}:{suffix}`.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.prefix)
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, CacheError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(CacheError::Timeout(self.timeout)),
        }
    }

    /// Runs `command` (on a clone of the connection) through the policy, each attempt
    /// bounded by `timeout`.
    async fn call<T, F, Fut>(&self, timeout: Duration, command: F) -> Result<T, CacheError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        Ok(self
            .policy
            .call(CacheError::is_failure, || {
                let command = command(self.connection.clone());
                async move {
                    match tokio::time::timeout(timeout, command).await {
                        Ok(result) => Ok(result?),
                        Err(_) => Err(CacheError::Timeout(timeout)),
                    }
                }
            })
            .await?)
    }

    /// Round trip, for health checks.
    pub async fn ping(&self) -> Result<(), CacheError> {
        let mut connection = self.connection.clone();
        self.bounded(redis::cmd("PING").query_async::<String>(&mut connection))
            .await?;
        Ok(())
    }

    /// The value at a full key.
    pub async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        let key = key.to_owned();
        self.call(self.timeout, move |mut connection| {
            let key = key.clone();
            async move { connection.get(key).await }
        })
        .await
    }

    /// The values at several full keys, in order.
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, CacheError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let command = Arc::new(redis::cmd("MGET").arg(keys).to_owned());
        self.call(self.timeout, move |mut connection| {
            let command = command.clone();
            async move { command.query_async(&mut connection).await }
        })
        .await
    }

    /// Sets a full key that expires after `ttl`.
    pub async fn set_expiring(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(), CacheError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.call(self.timeout, move |mut connection| {
            let (key, value) = (key.clone(), value.clone());
            async move { connection.set_ex(key, value, ttl.as_secs().max(1)).await }
        })
        .await
    }

    /// Sets every `(key, value)` and increments every counter key, atomically (MULTI/EXEC).
    pub async fn write_atomically(
        &self,
        values: &[(String, String)],
        counters: &[String],
        fence: Option<(&str, i64)>,
    ) -> Result<(), CacheError> {
        if let Some((fence_key, token)) = fence {
            return self.write_fenced(values, counters, fence_key, token).await;
        }
        let mut pipeline = redis::pipe();
        pipeline.atomic();
        for (key, value) in values {
            pipeline.set(key, value).ignore();
        }
        for key in counters {
            pipeline.incr(key, 1).ignore();
        }
        let pipeline = Arc::new(pipeline);
        // A big batch may take longer than one small call.
        self.call(self.timeout * 4, move |mut connection| {
            let pipeline = pipeline.clone();
            async move { pipeline.query_async::<()>(&mut connection).await }
        })
        .await
    }

    /// Makes `token` the one the fence key `key` accepts writes from; refused when a later
    /// holder already raised it.
    pub async fn raise_fence(&self, key: &str, token: i64) -> Result<(), CacheError> {
        let key = key.to_owned();
        let current = self
            .call(self.timeout, move |mut connection| {
                let key = key.clone();
                async move {
                    let mut invocation = RAISE_FENCE.key(key);
                    invocation.arg(token);
                    invocation.invoke_async::<i64>(&mut connection).await
                }
            })
            .await?;
        if current == token {
            Ok(())
        } else {
            Err(CacheError::Fenced {
                held: token,
                current,
            })
        }
    }

    /// [`Self::write_atomically`] in one script that first checks the fence key.
    async fn write_fenced(
        &self,
        values: &[(String, String)],
        counters: &[String],
        fence_key: &str,
        token: i64,
    ) -> Result<(), CacheError> {
        let mut keys = Vec::with_capacity(1 + values.len() + counters.len());
        let mut args = Vec::with_capacity(2 + values.len());
        keys.push(fence_key.to_owned());
        args.extend([token.to_string(), values.len().to_string()]);
        for (key, value) in values {
            keys.push(key.clone());
            args.push(value.clone());
        }
        keys.extend(counters.iter().cloned());
        let (keys, args) = (Arc::new(keys), Arc::new(args));
        let current = self
            .call(self.timeout * 4, move |mut connection| {
                let (keys, args) = (keys.clone(), args.clone());
                async move {
                    let mut invocation = FENCED_WRITE.prepare_invoke();
                    for key in keys.iter() {
                        invocation.key(key);
                    }
                    for arg in args.iter() {
                        invocation.arg(arg);
                    }
                    invocation.invoke_async::<i64>(&mut connection).await
                }
            })
            .await?;
        if current == token {
            Ok(())
        } else {
            Err(CacheError::Fenced {
                held: token,
                current,
            })
        }
    }
}
