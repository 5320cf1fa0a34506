//! What the SQLite and PostgreSQL backends share: the schema migrations and
//! every query. The SQL is portable (numbered `$N` parameters, `RETURNING`,
//! `ON CONFLICT`, no backend-only functions); [`sql_store!`] expands the one
//! implementation for each backend's row and connection types.

/// Schema migrations, applied in order at start. Never edit one that shipped:
/// append a new one.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE join_tokens (
    token_hash TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE TABLE agents (
    spiffe_id TEXT PRIMARY KEY,
    attestation_type TEXT NOT NULL,
    serial TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    evicted BOOLEAN NOT NULL DEFAULT FALSE,
    attested_at BIGINT NOT NULL
);
CREATE TABLE entries (
    id TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    selectors TEXT NOT NULL,
    x509_ttl BIGINT NOT NULL,
    jwt_ttl BIGINT NOT NULL,
    dns_names TEXT NOT NULL,
    hint TEXT NOT NULL,
    admin BOOLEAN NOT NULL,
    revision BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX entries_parent ON entries (parent_id);
CREATE INDEX entries_spiffe_id ON entries (spiffe_id);
CREATE TABLE entry_changes (
    revision BIGINT NOT NULL,
    parent_id TEXT NOT NULL,
    entry_id TEXT NOT NULL,
    PRIMARY KEY (parent_id, revision, entry_id)
);
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('entry_revision', 0);
CREATE TABLE bundles (
    trust_domain TEXT PRIMARY KEY,
    jwks TEXT NOT NULL,
    sequence BIGINT NOT NULL
);
"#,
    r#"
CREATE TABLE policy_sets (
    version BIGINT PRIMARY KEY,
    files TEXT NOT NULL,
    digest TEXT NOT NULL,
    comment TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    policies BIGINT NOT NULL
);
"#,
    r#"
CREATE TABLE bundle_parts (
    trust_domain TEXT NOT NULL,
    replica TEXT NOT NULL,
    jwks TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (trust_domain, replica)
);
"#,
    r#"
CREATE TABLE federated_bundles (
    trust_domain TEXT PRIMARY KEY,
    jwks TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
"#,
    r#"
ALTER TABLE federated_bundles ADD COLUMN endpoint_url TEXT NOT NULL DEFAULT '';
ALTER TABLE federated_bundles ADD COLUMN endpoint_spiffe_id TEXT NOT NULL DEFAULT '';
"#,
    r#"
ALTER TABLE entries ADD COLUMN federates_with TEXT NOT NULL DEFAULT '[]';
"#,
    r#"
ALTER TABLE entry_changes ADD COLUMN changed_at BIGINT NOT NULL DEFAULT 0;
CREATE INDEX entry_changes_entry ON entry_changes (entry_id, parent_id);
INSERT INTO counters (name, value) VALUES ('entry_changes_floor', 0);
"#,
    // Agents attested before: '*' (`service::ANY_SERIAL`), the first node
    // SVID each presents becomes its current one.
    r#"
ALTER TABLE agents ADD COLUMN new_serial TEXT NOT NULL DEFAULT '*';
"#,
    // Listing an agent's entries, or an ID's, a page at a time: the index
    // gives each page in ID order without sorting every match.
    r#"
CREATE INDEX entries_parent_page ON entries (parent_id, id);
CREATE INDEX entries_spiffe_id_page ON entries (spiffe_id, id);
DROP INDEX entries_parent;
DROP INDEX entries_spiffe_id;
"#,
];

/// The migration that added `entries.federates_with`: entries that existed
/// before it federate with every trust domain the CA held a bundle for, as
/// all workloads did then (see `backfill_federates_with`).
pub const FEDERATES_WITH_MIGRATION: usize = 6;

/// The migration that added `entry_changes.changed_at`: the rows before it
/// are dated to the upgrade, so deletions made just before it are kept for
/// the whole retention too.
pub const CHANGED_AT_MIGRATION: usize = 7;

/// Seconds since the Unix epoch, the time of an entry change.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The longest list of parents one entries notice names (PostgreSQL's
/// `NOTIFY` payload stops at 8,000 bytes); more take several notices.
pub const NOTICE_PARENTS_MAX: usize = 4000;

/// The page of entries after `$1` (an ID) that `filter` selects, `$N` the
/// filter's values in order (parent, then SPIFFE ID, those given), then the
/// limit. Each filter given is a plain equality: SQLite plans a statement
/// before it sees its values, and `($2 IS NULL OR parent_id = $2)` would
/// have it walk every entry in ID order instead of using the index.
pub fn list_entries_sql(filter: &super::EntryFilter) -> String {
    let mut sql = format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE id > $1");
    let mut n = 1;
    for (given, column) in [
        (filter.parent_id.is_some(), "parent_id"),
        (filter.spiffe_id.is_some(), "spiffe_id"),
    ] {
        if given {
            n += 1;
            sql += &format!(" AND {column} = ${n}");
        }
    }
    sql + &format!(" ORDER BY id LIMIT ${}", n + 1)
}

/// Columns are named, never `*`: PostgreSQL refuses to run a statement
/// prepared before another replica's migration added a column to its table
/// ("cached plan must not change result type"), and sqlx keeps its
/// statements prepared on each connection.
pub const AGENT_COLUMNS: &str =
    "spiffe_id, attestation_type, serial, new_serial, expires_at, evicted, attested_at";

pub const POLICY_SET_COLUMNS: &str = "version, files, digest, comment, created_at, policies";

pub const ENTRY_COLUMNS: &str = "id, spiffe_id, parent_id, selectors, x509_ttl, jwt_ttl, dns_names, hint, admin, revision, created_at, federates_with";

/// Implements [`super::Datastore`] for `$store` (which has a `pool` field),
/// with `$row` and `$conn` the backend's row and connection types, and its
/// `migrate`; `$lock` is a statement that serializes migrations between
/// processes sharing the database (PostgreSQL replicas), if any, and
/// `$notify` one that tells them of a committed change (`entries:REVISION:PARENTS`,
/// `policy:VERSION`, `bundle:SEQUENCE`, `agent:SPIFFE_ID`, `federation:TRUST_DOMAIN`), if any;
/// `$snapshot` one that makes a read transaction see one snapshot throughout,
/// where that is not the default; `$begin` the statement that starts a
/// writing transaction (SQLite's must take the write lock at once: a
/// deferred one that reads first fails, not waits, if another connection
/// commits before it writes).
macro_rules! sql_store {
    ($store:ident, $row:ty, $conn:ty, $lock:expr, $notify:expr, $snapshot:expr, $begin:expr) => {
        /// An agent's change notice, with its serials as now stored.
        fn agent_notice(a: &AgentRecord) -> String {
            format!("agent:{} {} {}", a.spiffe_id, a.serial, a.new_serial)
        }

        /// Runs `notify` (a statement taking the payload as `$1`) inside the
        /// writing transaction, so other processes hear of a change exactly
        /// when it commits.
        async fn announce(tx: &mut $conn, notify: Option<&str>, payload: &str) -> Result<()> {
            if let Some(sql) = notify {
                sqlx::query(sql).bind(payload).execute(tx).await?;
            }
            Ok(())
        }

        /// Stores an agent's record (its serials and expiry, if it had one)
        /// and announces it, in the caller's transaction.
        async fn write_agent(tx: &mut $conn, a: &AgentRecord) -> Result<()> {
            sqlx::query(
                "INSERT INTO agents (spiffe_id, attestation_type, serial, expires_at, evicted, attested_at, new_serial)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (spiffe_id) DO UPDATE SET serial = $3, expires_at = $4, new_serial = $7",
            )
            .bind(a.spiffe_id.to_string())
            .bind(&a.attestation_type)
            .bind(&a.serial)
            .bind(a.expires_at)
            .bind(a.evicted)
            .bind(a.attested_at)
            .bind(&a.new_serial)
            .execute(&mut *tx)
            .await?;
            announce(tx, $notify, &agent_notice(a)).await
        }

        /// Why a token that cannot be spent now cannot: unknown, used, or
        /// expired (read in the caller's transaction).
        async fn token_refusal(tx: &mut $conn, token_hash: &str) -> Result<TokenUse> {
            let row = sqlx::query("SELECT used_at FROM join_tokens WHERE token_hash = $1")
                .bind(token_hash)
                .fetch_optional(&mut *tx)
                .await?;
            Ok(match row {
                None => TokenUse::Unknown,
                Some(r) if r.try_get::<Option<i64>, _>("used_at")?.is_some() => TokenUse::AlreadyUsed,
                Some(_) => TokenUse::Expired,
            })
        }

        impl $store {
            /// Runs the migrations this database has not seen, in one transaction.
            async fn migrate(&self) -> Result<()> {
                let mut tx = self.pool.begin_with($begin).await?;
                let lock: Option<&str> = $lock;
                if let Some(lock) = lock {
                    sqlx::query(lock).execute(&mut *tx).await?;
                }
                sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
                    .execute(&mut *tx)
                    .await?;
                let current: Option<i64> =
                    sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
                        .fetch_one(&mut *tx)
                        .await?;
                let current = current.unwrap_or(0) as usize;
                if current > MIGRATIONS.len() {
                    return Err(StoreError::Corrupt(format!(
                        "database schema version {current} is newer than this ward ({}); upgrade ward",
                        MIGRATIONS.len()
                    )));
                }
                for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
                    sqlx::raw_sql(sql).execute(&mut *tx).await?;
                    if i + 1 == super::sql::FEDERATES_WITH_MIGRATION {
                        backfill_federates_with(&mut tx).await?;
                    }
                    if i + 1 == super::sql::CHANGED_AT_MIGRATION {
                        sqlx::query("UPDATE entry_changes SET changed_at = $1")
                            .bind(super::sql::unix_now())
                            .execute(&mut *tx)
                            .await?;
                    }
                    sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                        .bind((i + 1) as i64)
                        .execute(&mut *tx)
                        .await?;
                    tracing::info!(version = i + 1, "applied datastore migration");
                }
                tx.commit().await?;
                Ok(())
            }
        }

        fn corrupt(e: impl std::fmt::Display) -> StoreError {
            StoreError::Corrupt(e.to_string())
        }

        fn row_to_entry(row: &$row) -> Result<Entry> {
            let selectors: String = row.try_get("selectors")?;
            let selectors: Vec<String> = serde_json::from_str(&selectors).map_err(corrupt)?;
            let dns: String = row.try_get("dns_names")?;
            let federates: String = row.try_get("federates_with")?;
            let federates: Vec<String> = serde_json::from_str(&federates).map_err(corrupt)?;
            Ok(Entry {
                id: row.try_get("id")?,
                spiffe_id: SpiffeId::parse(row.try_get("spiffe_id")?).map_err(corrupt)?,
                parent_id: SpiffeId::parse(row.try_get("parent_id")?).map_err(corrupt)?,
                selectors: selectors
                    .iter()
                    .map(|s| Selector::parse(s))
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)?,
                x509_ttl: row.try_get("x509_ttl")?,
                jwt_ttl: row.try_get("jwt_ttl")?,
                dns_names: serde_json::from_str(&dns).map_err(corrupt)?,
                hint: row.try_get("hint")?,
                admin: row.try_get("admin")?,
                revision: row.try_get::<i64, _>("revision")? as u64,
                created_at: row.try_get("created_at")?,
                federates_with: federates
                    .iter()
                    .map(|t| TrustDomain::new(t))
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)?,
            })
        }

        fn row_to_policy_set(row: &$row) -> Result<PolicySetRecord> {
            let files: String = row.try_get("files")?;
            Ok(PolicySetRecord {
                version: row.try_get::<i64, _>("version")? as u64,
                files: serde_json::from_str(&files).map_err(corrupt)?,
                digest: row.try_get("digest")?,
                comment: row.try_get("comment")?,
                created_at: row.try_get("created_at")?,
                policies: row.try_get::<i64, _>("policies")? as u64,
            })
        }

        fn row_to_agent(row: &$row) -> Result<AgentRecord> {
            Ok(AgentRecord {
                spiffe_id: SpiffeId::parse(row.try_get("spiffe_id")?).map_err(corrupt)?,
                attestation_type: row.try_get("attestation_type")?,
                serial: row.try_get("serial")?,
                new_serial: row.try_get("new_serial")?,
                expires_at: row.try_get("expires_at")?,
                evicted: row.try_get("evicted")?,
                attested_at: row.try_get("attested_at")?,
            })
        }

        /// A JSON list of strings (how list columns are stored).
        fn json_list(items: impl Iterator<Item = String>) -> String {
            serde_json::to_string(&items.collect::<Vec<_>>()).expect("strings serialize")
        }

        fn federates_json(e: &Entry) -> String {
            json_list(e.federates_with.iter().map(|t| t.as_str().to_owned()))
        }

        fn selectors_json(e: &Entry) -> String {
            json_list(e.selectors.iter().map(|s| s.to_string()))
        }

        /// Upgrading keeps what workloads received: every existing entry
        /// federates with every trust domain there is a bundle for (one new
        /// revision, so agents pick the entries up again).
        async fn backfill_federates_with(tx: &mut $conn) -> Result<()> {
            let tds: Vec<String> = sqlx::query_scalar(
                "SELECT trust_domain FROM federated_bundles ORDER BY trust_domain",
            )
            .fetch_all(&mut *tx)
            .await?;
            if tds.is_empty() {
                return Ok(());
            }
            let rev = next_revision(&mut *tx).await? as i64;
            let n = sqlx::query("UPDATE entries SET federates_with = $1, revision = $2")
                .bind(serde_json::to_string(&tds).expect("strings serialize"))
                .bind(rev)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(
                "INSERT INTO entry_changes (revision, parent_id, entry_id) SELECT $1, parent_id, id FROM entries",
            )
            .bind(rev)
            .execute(&mut *tx)
            .await?;
            tracing::info!(entries = n, trust_domains = ?tds, "existing entries federate with every trust domain the CA holds a bundle for, as before per-entry federation");
            Ok(())
        }

        /// Every bundle `e` federates with exists, and stays until this
        /// transaction ends: touching the rows locks them (PostgreSQL; SQLite
        /// has one writer), so a concurrent `delete_federated_bundle` either
        /// finished first (and the entry is refused) or waits and then sees
        /// the entry (and is refused).
        async fn hold_federated_bundles(tx: &mut $conn, e: &Entry) -> Result<()> {
            for td in &e.federates_with {
                let n = sqlx::query(
                    "UPDATE federated_bundles SET updated_at = updated_at WHERE trust_domain = $1",
                )
                .bind(td.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n == 0 {
                    return Err(StoreError::InUse(format!(
                        "federates_with {}: there is no federated bundle for that trust domain (add it with `ward bundle set` first)",
                        td.id_string()
                    )));
                }
            }
            Ok(())
        }

        /// Refuses an entry that would repeat another's SPIFFE ID, parent
        /// and selectors (as SPIRE does: it would only add a second copy of
        /// the same SVID to every workload it selects). Called once the
        /// transaction holds the revision counter, which every entry writer
        /// takes: the entries it sees are all that are committed.
        async fn refuse_duplicate(tx: &mut $conn, e: &Entry) -> Result<()> {
            let other: Option<String> = sqlx::query_scalar(
                "SELECT id FROM entries WHERE spiffe_id = $1 AND parent_id = $2 AND selectors = $3 AND id <> $4 LIMIT 1",
            )
            .bind(e.spiffe_id.to_string())
            .bind(e.parent_id.to_string())
            .bind(selectors_json(e))
            .bind(&e.id)
            .fetch_optional(&mut *tx)
            .await?;
            match other {
                Some(other) => Err(StoreError::Conflict(format!(
                    "entry {other} already has SPIFFE ID {}, parent ID {} and these selectors",
                    e.spiffe_id, e.parent_id
                ))),
                None => Ok(()),
            }
        }

        /// The notices of a change to `entries` at `rev`: their parents,
        /// as many to a notice as fit.
        fn entries_notices(rev: u64, entries: &[Entry]) -> Vec<String> {
            let mut parents: Vec<String> = entries.iter().map(|e| e.parent_id.to_string()).collect();
            parents.sort();
            parents.dedup();
            let mut notices = Vec::new();
            let mut named = String::new();
            for p in parents {
                if !named.is_empty() && named.len() + 1 + p.len() > NOTICE_PARENTS_MAX {
                    notices.push(format!("entries:{rev}:{named}"));
                    named.clear();
                }
                if !named.is_empty() {
                    named.push(' ');
                }
                named.push_str(&p);
            }
            notices.push(format!("entries:{rev}:{named}"));
            notices
        }

        async fn next_revision(tx: &mut $conn) -> Result<u64> {
            let v: i64 = sqlx::query_scalar(
                "UPDATE counters SET value = value + 1 WHERE name = 'entry_revision' RETURNING value",
            )
            .fetch_one(tx)
            .await?;
            Ok(v as u64)
        }

        /// Records that entry `id` changed under `parent` at `revision`. The
        /// pair's older rows go: a sync reports an entry once, at its newest
        /// change, so they would never be read again.
        async fn record_change(
            tx: &mut $conn,
            revision: u64,
            parent: &SpiffeId,
            id: &str,
        ) -> Result<()> {
            sqlx::query("DELETE FROM entry_changes WHERE entry_id = $1 AND parent_id = $2 AND revision < $3")
                .bind(id)
                .bind(parent.to_string())
                .bind(revision as i64)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO entry_changes (revision, parent_id, entry_id, changed_at) VALUES ($1, $2, $3, $4)")
                .bind(revision as i64)
                .bind(parent.to_string())
                .bind(id)
                .bind(super::sql::unix_now())
                .execute(&mut *tx)
                .await?;
            Ok(())
        }

        fn placeholders(from: usize, n: usize) -> String {
            (from..from + n)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        }

        #[async_trait]
        impl Datastore for $store {
            fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<super::StoreChange>> {
                self.subscribe()
            }

            fn busy(&self) -> bool {
                self.pool_busy()
            }

            async fn create_join_token(&self, t: &JoinTokenRecord) -> Result<()> {
                sqlx::query(
                    "INSERT INTO join_tokens (token_hash, agent_id, expires_at, created_at) VALUES ($1, $2, $3, $4)",
                )
                .bind(&t.token_hash)
                .bind(t.agent_id.to_string())
                .bind(t.expires_at)
                .bind(t.created_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn join_token_state(&self, token_hash: &str, now: i64) -> Result<TokenUse> {
                let mut tx = self.pool.begin_with($begin).await?;
                let usable: Option<String> = sqlx::query_scalar(
                    "SELECT agent_id FROM join_tokens WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2",
                )
                .bind(token_hash)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                let state = match usable {
                    Some(id) => TokenUse::Accepted(SpiffeId::parse(&id).map_err(corrupt)?),
                    None => token_refusal(&mut tx, token_hash).await?,
                };
                tx.commit().await?;
                Ok(state)
            }

            async fn redeem_join_token(
                &self,
                token_hash: &str,
                now: i64,
                agent: &AgentRecord,
            ) -> Result<TokenUse> {
                let mut tx = self.pool.begin_with($begin).await?;
                let spent: Option<String> = sqlx::query_scalar(
                    "UPDATE join_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 AND agent_id = $3 RETURNING agent_id",
                )
                .bind(now)
                .bind(token_hash)
                .bind(agent.spiffe_id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
                let outcome = match spent {
                    Some(id) => {
                        write_agent(&mut tx, agent).await?;
                        TokenUse::Accepted(SpiffeId::parse(&id).map_err(corrupt)?)
                    }
                    None => token_refusal(&mut tx, token_hash).await?,
                };
                tx.commit().await?;
                Ok(outcome)
            }

            async fn upsert_agent(&self, a: &AgentRecord) -> Result<()> {
                let mut tx = self.pool.begin_with($begin).await?;
                write_agent(&mut tx, a).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn renew_agent(&self, read: &AgentRecord, renewed: &AgentRecord) -> Result<bool> {
                let mut tx = self.pool.begin_with($begin).await?;
                let r = sqlx::query(
                    "UPDATE agents SET serial = $1, new_serial = $2, expires_at = $3
                     WHERE spiffe_id = $4 AND serial = $5 AND new_serial = $6 AND NOT evicted",
                )
                .bind(&renewed.serial)
                .bind(&renewed.new_serial)
                .bind(renewed.expires_at)
                .bind(read.spiffe_id.to_string())
                .bind(&read.serial)
                .bind(&read.new_serial)
                .execute(&mut *tx)
                .await?;
                // Other replicas forget what they hold of the agent (the one
                // that renewed keeps the record it holds, which matches).
                if r.rows_affected() > 0 {
                    announce(&mut tx, $notify, &agent_notice(renewed)).await?;
                }
                tx.commit().await?;
                Ok(r.rows_affected() > 0)
            }

            async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>> {
                sqlx::query(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE spiffe_id = $1"))
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await?
                    .as_ref()
                    .map(row_to_agent)
                    .transpose()
            }

            async fn list_agents(&self, after: Option<&str>, limit: u32) -> Result<Vec<AgentRecord>> {
                sqlx::query(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE spiffe_id > $1 ORDER BY spiffe_id LIMIT $2"))
                    .bind(after.unwrap_or(""))
                    .bind(limit as i64)
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map(row_to_agent)
                    .collect()
            }

            async fn evict_agent(&self, id: &SpiffeId) -> Result<bool> {
                let mut tx = self.pool.begin_with($begin).await?;
                let r = sqlx::query("UPDATE agents SET evicted = TRUE WHERE spiffe_id = $1")
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await?;
                announce(&mut tx, $notify, &format!("agent:{id}")).await?;
                tx.commit().await?;
                Ok(r.rows_affected() > 0)
            }

            async fn revoke_join_tokens(&self, id: &SpiffeId, now: i64) -> Result<u64> {
                let mut tx = self.pool.begin_with($begin).await?;
                let expiries: Vec<i64> = sqlx::query_scalar(
                    "DELETE FROM join_tokens WHERE agent_id = $1 AND used_at IS NULL RETURNING expires_at",
                )
                .bind(id.to_string())
                .fetch_all(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(expiries.iter().filter(|&&at| at > now).count() as u64)
            }

            async fn create_entry(&self, mut e: Entry, now: i64) -> Result<Entry> {
                let mut tx = self.pool.begin_with($begin).await?;
                hold_federated_bundles(&mut tx, &e).await?;
                let rev = next_revision(&mut tx).await?;
                refuse_duplicate(&mut tx, &e).await?;
                e.revision = rev;
                e.created_at = now;
                sqlx::query(&format!(
                    "INSERT INTO entries ({ENTRY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
                ))
                .bind(&e.id)
                .bind(e.spiffe_id.to_string())
                .bind(e.parent_id.to_string())
                .bind(selectors_json(&e))
                .bind(e.x509_ttl)
                .bind(e.jwt_ttl)
                .bind(serde_json::to_string(&e.dns_names).expect("strings serialize"))
                .bind(&e.hint)
                .bind(e.admin)
                .bind(rev as i64)
                .bind(now)
                .bind(federates_json(&e))
                .execute(&mut *tx)
                .await
                .map_err(|err| match &err {
                    sqlx::Error::Database(d) if d.is_unique_violation() => {
                        StoreError::Conflict(format!("entry {}", e.id))
                    }
                    _ => StoreError::Db(err),
                })?;
                record_change(&mut tx, rev, &e.parent_id, &e.id).await?;
                announce(&mut tx, $notify, &format!("entries:{rev}:{}", e.parent_id)).await?;
                tx.commit().await?;
                Ok(e)
            }

            async fn update_entry(&self, mut e: Entry) -> Result<Entry> {
                let mut tx = self.pool.begin_with($begin).await?;
                hold_federated_bundles(&mut tx, &e).await?;
                let old = sqlx::query(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM entries WHERE id = $1"
                ))
                .bind(&e.id)
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(row_to_entry)
                .transpose()?
                .ok_or_else(|| StoreError::NotFound(format!("entry {}", e.id)))?;
                // `e.revision`, when set, is the revision the caller read
                // (and authorized against): the update applies only to that.
                let expected = if e.revision == 0 { old.revision } else { e.revision };
                let rev = next_revision(&mut tx).await?;
                // (Copies made before they were refused can still have their
                // TTLs, hints and so on changed.)
                if (&old.spiffe_id, &old.parent_id, selectors_json(&old))
                    != (&e.spiffe_id, &e.parent_id, selectors_json(&e))
                {
                    refuse_duplicate(&mut tx, &e).await?;
                }
                e.revision = rev;
                e.created_at = old.created_at;
                let n = sqlx::query(
                    "UPDATE entries SET spiffe_id = $2, parent_id = $3, selectors = $4, x509_ttl = $5, jwt_ttl = $6,
                     dns_names = $7, hint = $8, admin = $9, revision = $10, federates_with = $11
                     WHERE id = $1 AND revision = $12",
                )
                .bind(&e.id)
                .bind(e.spiffe_id.to_string())
                .bind(e.parent_id.to_string())
                .bind(selectors_json(&e))
                .bind(e.x509_ttl)
                .bind(e.jwt_ttl)
                .bind(serde_json::to_string(&e.dns_names).expect("strings serialize"))
                .bind(&e.hint)
                .bind(e.admin)
                .bind(rev as i64)
                .bind(federates_json(&e))
                .bind(expected as i64)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n == 0 {
                    return Err(StoreError::Stale(format!(
                        "entry {} changed while this update was being made (it is no longer at revision {expected}); read it again and retry",
                        e.id
                    )));
                }
                record_change(&mut tx, rev, &e.parent_id, &e.id).await?;
                if old.parent_id != e.parent_id {
                    record_change(&mut tx, rev, &old.parent_id, &e.id).await?;
                }
                announce(
                    &mut tx,
                    $notify,
                    &format!("entries:{rev}:{} {}", e.parent_id, old.parent_id),
                )
                .await?;
                tx.commit().await?;
                Ok(e)
            }

            async fn delete_entry(&self, id: &str, expected_revision: u64) -> Result<Entry> {
                let mut tx = self.pool.begin_with($begin).await?;
                // The counter first, then the row, as every entry writer
                // takes them (the other order could deadlock with an update).
                let rev = next_revision(&mut tx).await?;
                let old = sqlx::query(&format!(
                    "DELETE FROM entries WHERE id = $1 AND (revision = $2 OR $2 = 0) RETURNING {ENTRY_COLUMNS}"
                ))
                .bind(id)
                .bind(expected_revision as i64)
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(row_to_entry)
                .transpose()?;
                let Some(old) = old else {
                    let exists: Option<i64> = sqlx::query_scalar("SELECT revision FROM entries WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    return Err(match exists {
                        Some(_) => StoreError::Stale(format!(
                            "entry {id} changed while it was being deleted (it is no longer at revision {expected_revision}); read it again and retry"
                        )),
                        None => StoreError::NotFound(format!("entry {id}")),
                    });
                };
                record_change(&mut tx, rev, &old.parent_id, id).await?;
                announce(&mut tx, $notify, &format!("entries:{rev}:{}", old.parent_id)).await?;
                tx.commit().await?;
                Ok(Entry {
                    revision: rev,
                    ..old
                })
            }

            async fn entry_revision(&self) -> Result<u64> {
                let v: i64 = sqlx::query_scalar("SELECT value FROM counters WHERE name = 'entry_revision'")
                    .fetch_one(&self.pool)
                    .await?;
                Ok(v as u64)
            }

            async fn get_entry(&self, id: &str) -> Result<Option<Entry>> {
                sqlx::query(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM entries WHERE id = $1"
                ))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .as_ref()
                .map(row_to_entry)
                .transpose()
            }

            async fn get_entries(&self, ids: &[String]) -> Result<Vec<Entry>> {
                let mut out = Vec::with_capacity(ids.len());
                // Bounded IN lists: SQLite allows at most 32766 parameters per statement.
                for chunk in ids.chunks(500) {
                    let sql = format!(
                        "SELECT {ENTRY_COLUMNS} FROM entries WHERE id IN ({})",
                        placeholders(1, chunk.len())
                    );
                    let mut q = sqlx::query(&sql);
                    for id in chunk {
                        q = q.bind(id);
                    }
                    for row in q.fetch_all(&self.pool).await? {
                        out.push(row_to_entry(&row)?);
                    }
                }
                Ok(out)
            }

            async fn signing_entries(
                &self,
                parent: &SpiffeId,
                ids: &[String],
            ) -> Result<Vec<SigningEntry>> {
                let mut out = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(500) {
                    let sql = format!(
                        "SELECT id, spiffe_id, dns_names, x509_ttl FROM entries WHERE parent_id = $1 AND id IN ({})",
                        placeholders(2, chunk.len())
                    );
                    let mut q = sqlx::query(&sql).bind(parent.to_string());
                    for id in chunk {
                        q = q.bind(id);
                    }
                    for row in q.fetch_all(&self.pool).await? {
                        let dns: String = row.try_get("dns_names")?;
                        out.push(SigningEntry {
                            id: row.try_get("id")?,
                            spiffe_id: SpiffeId::parse(row.try_get("spiffe_id")?).map_err(corrupt)?,
                            dns_names: if dns == "[]" {
                                Vec::new()
                            } else {
                                serde_json::from_str(&dns).map_err(corrupt)?
                            },
                            x509_ttl: row.try_get("x509_ttl")?,
                        });
                    }
                }
                Ok(out)
            }

            async fn agent_standing(&self, id: &SpiffeId) -> Result<Option<AgentStanding>> {
                let row: Option<(bool, String)> =
                    sqlx::query_as("SELECT evicted, serial FROM agents WHERE spiffe_id = $1")
                        .bind(id.to_string())
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(row.map(|(evicted, serial)| AgentStanding { evicted, serial }))
            }

            async fn list_entries(
                &self,
                filter: &EntryFilter,
                after_id: Option<&str>,
                limit: u32,
            ) -> Result<Vec<Entry>> {
                let sql = super::sql::list_entries_sql(filter);
                let mut q = sqlx::query(&sql).bind(after_id.unwrap_or(""));
                for id in [&filter.parent_id, &filter.spiffe_id].into_iter().flatten() {
                    q = q.bind(id.to_string());
                }
                let rows = q.bind(limit as i64).fetch_all(&self.pool).await?;
                rows.iter().map(row_to_entry).collect()
            }

            async fn sync_entries_after(
                &self,
                parent: &SpiffeId,
                since: u64,
                after: &str,
                limit: u32,
            ) -> Result<SyncPage> {
                // One snapshot: the current revision, the changes up to it and
                // the pruning floor agree (PostgreSQL's default would give each
                // statement its own, and a write in between can replace a row
                // read here by one above the current revision).
                let mut tx = self.pool.begin().await?;
                let snapshot: Option<&str> = $snapshot;
                if let Some(sql) = snapshot {
                    sqlx::query(sql).execute(&mut *tx).await?;
                }
                let current: i64 =
                    sqlx::query_scalar("SELECT value FROM counters WHERE name = 'entry_revision'")
                        .fetch_one(&mut *tx)
                        .await?;
                // Pages are ordered by (revision, entry ID), so one may end
                // inside a revision many entries share; the next goes on after
                // its last entry.
                let limit = limit.max(1) as usize;
                let mut changed = sqlx::query(
                    "SELECT entry_id, MAX(revision) AS rev FROM entry_changes
                     WHERE parent_id = $1 AND revision >= $2 AND revision <= $3
                     GROUP BY entry_id
                     HAVING MAX(revision) > $2 OR (MAX(revision) = $2 AND $4 <> '' AND entry_id > $4)
                     ORDER BY rev, entry_id LIMIT $5",
                )
                .bind(parent.to_string())
                .bind(since as i64)
                .bind(current)
                .bind(after)
                .bind(limit as i64 + 1)
                .fetch_all(&mut *tx)
                .await?;
                let more = changed.len() > limit;
                changed.truncate(limit);
                let floor: i64 =
                    sqlx::query_scalar("SELECT value FROM counters WHERE name = 'entry_changes_floor'")
                        .fetch_one(&mut *tx)
                        .await?;
                let ids: Vec<String> = changed
                    .iter()
                    .map(|r| r.try_get("entry_id"))
                    .collect::<Result<_, _>>()?;
                let (revision, next_after) = match (more, changed.last()) {
                    (true, Some(last)) => (
                        last.try_get::<i64, _>("rev")? as u64,
                        last.try_get::<String, _>("entry_id")?,
                    ),
                    _ => (current as u64, String::new()),
                };
                // Deletions at or before the floor are gone: a caller behind
                // it (or inside its revision) may have missed some. A caller
                // ahead of the current revision synced with a database that
                // had changes this one has not (restored from a backup, or a
                // standby taking over): what it holds may be gone, and its
                // revisions will be given to other changes.
                let floor = floor as u64;
                let behind = since > 0 && (since < floor || (since == floor && !after.is_empty()));
                let mut page = SyncPage {
                    revision,
                    after: next_after,
                    more,
                    restart: behind || since > current as u64,
                    ..SyncPage::default()
                };
                let mut current_entries = std::collections::HashMap::new();
                for chunk in ids.chunks(500) {
                    let sql = format!(
                        "SELECT {ENTRY_COLUMNS} FROM entries WHERE id IN ({})",
                        placeholders(1, chunk.len())
                    );
                    let mut q = sqlx::query(&sql);
                    for id in chunk {
                        q = q.bind(id);
                    }
                    for row in q.fetch_all(&mut *tx).await? {
                        let e = row_to_entry(&row)?;
                        current_entries.insert(e.id.clone(), e);
                    }
                }
                tx.commit().await?;
                for id in ids {
                    match current_entries.remove(&id) {
                        Some(e) if &e.parent_id == parent => page.entries.push(e),
                        _ => page.deleted.push(id),
                    }
                }
                Ok(page)
            }

            async fn prune_entry_changes(&self, before: i64) -> Result<PrunedChanges> {
                let mut tx = self.pool.begin_with($begin).await?;
                // Rows an entry's newer change under the same parent supersedes
                // (left by versions that kept every change).
                let superseded = sqlx::query(
                    "DELETE FROM entry_changes WHERE EXISTS (
                         SELECT 1 FROM entry_changes n
                          WHERE n.entry_id = entry_changes.entry_id
                            AND n.parent_id = entry_changes.parent_id
                            AND n.revision > entry_changes.revision)",
                )
                .execute(&mut *tx)
                .await?
                .rows_affected();
                // Deletions (the entry is gone, or under another parent now)
                // older than `before`: the newest looked at, then deleted (a
                // change made meanwhile is newer than `before`). Not returned
                // row by row: after an upgrade from a version that kept every
                // change there may be millions. (Counted as deleted: another
                // replica pruning at once may have taken some.)
                const GONE: &str = "FROM entry_changes
                      WHERE changed_at < $1
                        AND NOT EXISTS (SELECT 1 FROM entries e
                                         WHERE e.id = entry_changes.entry_id
                                           AND e.parent_id = entry_changes.parent_id)";
                let newest: Option<i64> =
                    sqlx::query_scalar(&format!("SELECT MAX(revision) {GONE}"))
                        .bind(before)
                        .fetch_one(&mut *tx)
                        .await?;
                let deletions = sqlx::query(&format!("DELETE {GONE}"))
                    .bind(before)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if let Some(max) = newest {
                    sqlx::query(
                        "UPDATE counters SET value = $1 WHERE name = 'entry_changes_floor' AND value < $1",
                    )
                    .bind(max)
                    .execute(&mut *tx)
                    .await?;
                }
                let floor: i64 =
                    sqlx::query_scalar("SELECT value FROM counters WHERE name = 'entry_changes_floor'")
                        .fetch_one(&mut *tx)
                        .await?;
                tx.commit().await?;
                Ok(PrunedChanges {
                    superseded,
                    deletions,
                    floor: floor as u64,
                })
            }

            async fn get_bundle(&self, trust_domain: &str) -> Result<Option<(Vec<u8>, u64)>> {
                let row = sqlx::query("SELECT jwks, sequence FROM bundles WHERE trust_domain = $1")
                    .bind(trust_domain)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|r| {
                    let jwks: String = r.try_get("jwks")?;
                    let seq: i64 = r.try_get("sequence")?;
                    Ok((jwks.into_bytes(), seq as u64))
                })
                .transpose()
            }

            async fn publish_bundle_part(
                &self,
                td: &TrustDomain,
                replica: &str,
                part: &[u8],
                expires_at: i64,
                now: i64,
            ) -> Result<(Vec<u8>, u64)> {
                let part = std::str::from_utf8(part).map_err(corrupt)?;
                let mut tx = self.pool.begin_with($begin).await?;
                // One replica at a time merges (SQLite writers are serialized anyway).
                let lock: Option<&str> = $lock;
                if let Some(lock) = lock {
                    sqlx::query(lock).execute(&mut *tx).await?;
                }
                sqlx::query(
                    "INSERT INTO bundle_parts (trust_domain, replica, jwks, expires_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (trust_domain, replica) DO UPDATE SET jwks = $3, expires_at = $4",
                )
                .bind(td.as_str())
                .bind(replica)
                .bind(part)
                .bind(expires_at)
                .execute(&mut *tx)
                .await?;
                let parts: Vec<String> = sqlx::query_scalar(
                    "SELECT jwks FROM bundle_parts WHERE trust_domain = $1 AND expires_at > $2 ORDER BY replica",
                )
                .bind(td.as_str())
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
                let parts: Vec<Vec<u8>> = parts.into_iter().map(String::into_bytes).collect();
                let mut merged = super::merge_bundle_parts(td, &parts)?;
                let stored = sqlx::query("SELECT jwks, sequence FROM bundles WHERE trust_domain = $1")
                    .bind(td.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                let (stored_jwks, stored_seq) = match &stored {
                    Some(r) => (
                        Some(r.try_get::<String, _>("jwks")?),
                        r.try_get::<i64, _>("sequence")? as u64,
                    ),
                    None => (None, 0),
                };
                let unchanged = stored_jwks
                    .as_deref()
                    .and_then(|j| TrustBundle::from_jwks(td.clone(), j.as_bytes()).ok())
                    .is_some_and(|b| {
                        b.x509_authorities == merged.x509_authorities
                            && b.jwt_authorities == merged.jwt_authorities
                    });
                if unchanged {
                    tx.commit().await?;
                    return Ok((stored_jwks.unwrap_or_default().into_bytes(), stored_seq));
                }
                merged.sequence = stored_seq + 1;
                let jwks = merged.to_jwks();
                sqlx::query(
                    "INSERT INTO bundles (trust_domain, jwks, sequence) VALUES ($1, $2, $3)
                     ON CONFLICT (trust_domain) DO UPDATE SET jwks = $2, sequence = $3",
                )
                .bind(td.as_str())
                .bind(std::str::from_utf8(&jwks).map_err(corrupt)?)
                .bind(merged.sequence as i64)
                .execute(&mut *tx)
                .await?;
                announce(&mut tx, $notify, &format!("bundle:{}", merged.sequence)).await?;
                tx.commit().await?;
                Ok((jwks, merged.sequence))
            }

            async fn add_policy_set(&self, set: &PolicySetRecord) -> Result<u64> {
                let files = serde_json::to_string(&set.files).map_err(corrupt)?;
                let mut tx = self.pool.begin_with($begin).await?;
                let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM policy_sets")
                    .fetch_one(&mut *tx)
                    .await?;
                let version = newest.unwrap_or(0) + 1;
                sqlx::query(
                    "INSERT INTO policy_sets (version, files, digest, comment, created_at, policies)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(version)
                .bind(files)
                .bind(&set.digest)
                .bind(&set.comment)
                .bind(set.created_at)
                .bind(set.policies as i64)
                .execute(&mut *tx)
                .await?;
                announce(&mut tx, $notify, &format!("policy:{version}")).await?;
                tx.commit().await?;
                Ok(version as u64)
            }

            async fn get_policy_set(&self, version: Option<u64>) -> Result<Option<PolicySetRecord>> {
                let row = match version {
                    Some(v) => {
                        sqlx::query(&format!("SELECT {POLICY_SET_COLUMNS} FROM policy_sets WHERE version = $1"))
                            .bind(v as i64)
                            .fetch_optional(&self.pool)
                            .await?
                    }
                    None => {
                        sqlx::query(&format!("SELECT {POLICY_SET_COLUMNS} FROM policy_sets ORDER BY version DESC LIMIT 1"))
                            .fetch_optional(&self.pool)
                            .await?
                    }
                };
                row.as_ref().map(row_to_policy_set).transpose()
            }

            async fn list_policy_sets(
                &self,
                before: Option<u64>,
                limit: u32,
            ) -> Result<Vec<PolicySetRecord>> {
                let before = before.map_or(i64::MAX, |v| v.min(i64::MAX as u64) as i64);
                let rows = sqlx::query(
                    &format!("SELECT {POLICY_SET_COLUMNS} FROM policy_sets WHERE version < $1 ORDER BY version DESC LIMIT $2"),
                )
                .bind(before)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(row_to_policy_set).collect()
            }

            async fn set_federated_bundle(
                &self,
                b: &FederatedBundleRecord,
                now: i64,
            ) -> Result<()> {
                let td = &b.trust_domain;
                let jwks = std::str::from_utf8(&b.jwks)
                    .map_err(|e| StoreError::Corrupt(format!("bundle of {td}: {e}")))?;
                let mut tx = self.pool.begin_with($begin).await?;
                sqlx::query(
                    "INSERT INTO federated_bundles (trust_domain, jwks, updated_at, endpoint_url, endpoint_spiffe_id)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (trust_domain) DO UPDATE
                     SET jwks = $2, updated_at = $3, endpoint_url = $4, endpoint_spiffe_id = $5",
                )
                .bind(td)
                .bind(jwks)
                .bind(now)
                .bind(&b.endpoint_url)
                .bind(&b.endpoint_spiffe_id)
                .execute(&mut *tx)
                .await?;
                announce(&mut tx, $notify, &format!("federation:{td}")).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn refresh_federated_bundle(
                &self,
                read: &FederatedBundleRecord,
                jwks: &[u8],
                now: i64,
            ) -> Result<bool> {
                let td = &read.trust_domain;
                let text = |b: &[u8]| {
                    String::from_utf8(b.to_vec())
                        .map_err(|e| StoreError::Corrupt(format!("bundle of {td}: {e}")))
                };
                let mut tx = self.pool.begin_with($begin).await?;
                let n = sqlx::query(
                    "UPDATE federated_bundles SET jwks = $2, updated_at = $3
                     WHERE trust_domain = $1 AND jwks = $4 AND endpoint_url = $5 AND endpoint_spiffe_id = $6",
                )
                .bind(td)
                .bind(text(jwks)?)
                .bind(now)
                .bind(text(&read.jwks)?)
                .bind(&read.endpoint_url)
                .bind(&read.endpoint_spiffe_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n == 0 {
                    return Ok(false);
                }
                announce(&mut tx, $notify, &format!("federation:{td}")).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn delete_federated_bundle(
                &self,
                trust_domain: &str,
                mode: BundleDeleteMode,
            ) -> Result<BundleDeleted> {
                let mut tx = self.pool.begin_with($begin).await?;
                // Deleted first, so the row is locked before the entries are
                // read: an entry created concurrently is seen, or refused.
                let r = sqlx::query("DELETE FROM federated_bundles WHERE trust_domain = $1")
                    .bind(trust_domain)
                    .execute(&mut *tx)
                    .await?;
                if r.rows_affected() == 0 {
                    return Ok(BundleDeleted::default());
                }
                // Changing entries: the revision counter is taken before they
                // are read, so a writer that holds it has committed by then
                // and what is read is what is changed (PostgreSQL reads each
                // statement's own snapshot).
                let rev = match mode {
                    BundleDeleteMode::Restrict => None,
                    _ => Some(next_revision(&mut tx).await?),
                };
                // The pattern narrows the search; the parsed list decides
                // (`_` in a name is a LIKE wildcard).
                let quoted = serde_json::to_string(trust_domain).expect("strings serialize");
                let candidates = sqlx::query(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM entries WHERE federates_with LIKE $1 ORDER BY id"
                ))
                .bind(format!("%{quoted}%"))
                .fetch_all(&mut *tx)
                .await?;
                let mut users = Vec::new();
                for row in &candidates {
                    let e = row_to_entry(row)?;
                    if e.federates_with.iter().any(|t| t.as_str() == trust_domain) {
                        users.push(e);
                    }
                }
                let mut done = BundleDeleted {
                    found: true,
                    ..Default::default()
                };
                if !users.is_empty() {
                    let Some(rev) = rev else {
                        let ids: Vec<&str> = users.iter().take(10).map(|e| e.id.as_str()).collect();
                        let more = if users.len() > 10 { ", …" } else { "" };
                        // Dropping the transaction rolls the delete back.
                        return Err(StoreError::InUse(format!(
                            "{} entr{} federate with {trust_domain} ({}{more}); remove it from their federates_with, or delete the bundle with mode dissociate (or delete, which deletes those entries)",
                            users.len(),
                            if users.len() == 1 { "y" } else { "ies" },
                            ids.join(", ")
                        )));
                    };
                    for e in &users {
                        if mode == BundleDeleteMode::Dissociate {
                            let mut kept = e.clone();
                            kept.federates_with.retain(|t| t.as_str() != trust_domain);
                            sqlx::query("UPDATE entries SET federates_with = $2, revision = $3 WHERE id = $1")
                                .bind(&e.id)
                                .bind(federates_json(&kept))
                                .bind(rev as i64)
                                .execute(&mut *tx)
                                .await?;
                        } else {
                            sqlx::query("DELETE FROM entries WHERE id = $1")
                                .bind(&e.id)
                                .execute(&mut *tx)
                                .await?;
                        }
                        record_change(&mut tx, rev, &e.parent_id, &e.id).await?;
                    }
                    for notice in entries_notices(rev, &users) {
                        announce(&mut tx, $notify, &notice).await?;
                    }
                    done.revision = Some(rev);
                    done.entries = users;
                }
                announce(&mut tx, $notify, &format!("federation:{trust_domain}")).await?;
                tx.commit().await?;
                Ok(done)
            }

            async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundleRecord>> {
                let rows = sqlx::query(
                    "SELECT trust_domain, jwks, endpoint_url, endpoint_spiffe_id
                     FROM federated_bundles ORDER BY trust_domain",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        let jwks: String = r.try_get("jwks")?;
                        Ok(FederatedBundleRecord {
                            trust_domain: r.try_get("trust_domain")?,
                            jwks: jwks.into_bytes(),
                            endpoint_url: r.try_get("endpoint_url")?,
                            endpoint_spiffe_id: r.try_get("endpoint_spiffe_id")?,
                        })
                    })
                    .collect()
            }

            async fn ping(&self) -> Result<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }
        }
    };
}

pub(crate) use sql_store;
