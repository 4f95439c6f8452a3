// One set of migrations for SQLite and PostgreSQL. Only the column types that differ are chosen
// per dialect (auto-increment keys and binary columns).

import { sql, type Kysely, type Migration, type MigrationProvider } from 'kysely';
import type { Dialect } from './database.js';

function migrations(dialect: Dialect): Record<string, Migration> {
  const binary = dialect === 'postgres' ? 'bytea' : 'blob';
  const autoId = (db: Kysely<unknown>, table: string) =>
    dialect === 'postgres'
      ? db.schema.createTable(table).addColumn('id', 'serial', (c) => c.primaryKey())
      : db.schema.createTable(table).addColumn('id', 'integer', (c) => c.primaryKey().autoIncrement());
  return {
    '0001_foundation': {
      async up(db: Kysely<unknown>) {
        await autoId(db, 'certificate_authorities')
          .addColumn('name', 'text', (c) => c.notNull().unique())
          .addColumn('role', 'text', (c) => c.notNull().check(sql`role in ('root', 'intermediate')`))
          .addColumn('parent_id', 'integer', (c) => c.references('certificate_authorities.id'))
          .addColumn('status', 'text', (c) => c.notNull().check(sql`status in ('pending', 'active', 'retired', 'revoked')`))
          .addColumn('subject', 'text', (c) => c.notNull())
          .addColumn('key_ref', 'text')
          .addColumn('key_algorithm', 'text', (c) => c.notNull())
          .addColumn('ski', 'text', (c) => c.notNull())
          .addColumn('path_len', 'integer')
          .addColumn('certificate_der', binary)
          .addColumn('csr_der', binary)
          .addColumn('serial', 'text')
          .addColumn('not_before', 'text')
          .addColumn('not_after', 'text')
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addColumn('updated_at', 'text', (c) => c.notNull())
          .execute();

        await autoId(db, 'certificates')
          .addColumn('issuer_id', 'integer', (c) => c.notNull().references('certificate_authorities.id'))
          .addColumn('serial', 'text', (c) => c.notNull())
          .addColumn('profile', 'text', (c) => c.notNull())
          .addColumn('subject', 'text', (c) => c.notNull())
          .addColumn('fingerprint_sha256', 'text', (c) => c.notNull())
          .addColumn('not_before', 'text', (c) => c.notNull())
          .addColumn('not_after', 'text', (c) => c.notNull())
          .addColumn('der', binary, (c) => c.notNull())
          .addColumn('status', 'text', (c) => c.notNull().check(sql`status in ('valid', 'revoked')`))
          .addColumn('revoked_at', 'text')
          .addColumn('revocation_reason', 'text')
          .addColumn('requested_by', 'text', (c) => c.notNull())
          .addColumn('created_at', 'text', (c) => c.notNull())
          // Serial numbers are unique per issuer by constraint, not by hope.
          .addUniqueConstraint('certificates_issuer_serial_unique', ['issuer_id', 'serial'])
          .execute();
        await db.schema.createIndex('certificates_not_after').on('certificates').column('not_after').execute();
        await db.schema.createIndex('certificates_serial').on('certificates').column('serial').execute();

        await db.schema.createTable('audit_log')
          .addColumn('seq', 'integer', (c) => c.primaryKey())
          .addColumn('at', 'text', (c) => c.notNull())
          .addColumn('actor', 'text', (c) => c.notNull())
          .addColumn('action', 'text', (c) => c.notNull())
          .addColumn('target', 'text', (c) => c.notNull())
          .addColumn('details', 'text', (c) => c.notNull())
          .addColumn('prev_hash', 'text', (c) => c.notNull())
          .addColumn('hash', 'text', (c) => c.notNull())
          .execute();

        await db.schema.createTable('api_tokens')
          .addColumn('id', 'text', (c) => c.primaryKey())
          .addColumn('name', 'text', (c) => c.notNull())
          .addColumn('scopes', 'text', (c) => c.notNull())
          .addColumn('secret_hash', 'text', (c) => c.notNull())
          .addColumn('created_by', 'text', (c) => c.notNull())
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addColumn('expires_at', 'text')
          .addColumn('revoked_at', 'text')
          .addColumn('last_used_at', 'text')
          .execute();
      },
      async down(db: Kysely<unknown>) {
        for (const t of ['api_tokens', 'audit_log', 'certificates', 'certificate_authorities']) await db.schema.dropTable(t).execute();
      },
    },
    '0002_registry': {
      async up(db: Kysely<unknown>) {
        await db.schema.createTable('tenants')
          .addColumn('name', 'text', (c) => c.primaryKey())
          .addColumn('created_at', 'text', (c) => c.notNull())
          .execute();
        await autoId(db, 'products')
          .addColumn('name', 'text', (c) => c.notNull().unique())
          .addColumn('profile', 'text', (c) => c.notNull())
          .addColumn('validity_days', 'integer', (c) => c.notNull())
          .addColumn('created_at', 'text', (c) => c.notNull())
          .execute();
        await autoId(db, 'lines')
          .addColumn('name', 'text', (c) => c.notNull().unique())
          .addColumn('ca_id', 'integer', (c) => c.notNull().references('certificate_authorities.id'))
          .addColumn('refused_issuances', 'integer', (c) => c.notNull().defaultTo(0))
          .addColumn('created_at', 'text', (c) => c.notNull())
          .execute();
        await db.schema.createTable('batches')
          .addColumn('id', 'text', (c) => c.primaryKey())
          .addColumn('product_id', 'integer', (c) => c.notNull().references('products.id'))
          .addColumn('line_id', 'integer', (c) => c.notNull().references('lines.id'))
          .addColumn('quota', 'integer', (c) => c.notNull().check(sql`quota >= 0`))
          // Devices of this batch that ever received an operational identity; never above quota.
          .addColumn('issued_count', 'integer', (c) => c.notNull().defaultTo(0))
          .addColumn('refused_count', 'integer', (c) => c.notNull().defaultTo(0))
          .addColumn('allow_unregistered', 'integer', (c) => c.notNull().defaultTo(0))
          .addColumn('expires_at', 'text')
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addCheckConstraint('batches_quota_cap', sql`issued_count <= quota`)
          .execute();
        await autoId(db, 'vendors')
          .addColumn('name', 'text', (c) => c.notNull().unique())
          .addColumn('created_at', 'text', (c) => c.notNull())
          .execute();
        await autoId(db, 'vendor_cas')
          .addColumn('vendor_id', 'integer', (c) => c.notNull().references('vendors.id'))
          .addColumn('subject', 'text', (c) => c.notNull())
          .addColumn('fingerprint_sha256', 'text', (c) => c.notNull().unique())
          .addColumn('der', binary, (c) => c.notNull())
          .addColumn('not_after', 'text', (c) => c.notNull())
          .addColumn('created_at', 'text', (c) => c.notNull())
          .execute();
        await db.schema.createTable('devices')
          .addColumn('udid', 'text', (c) => c.primaryKey())
          .addColumn('public_key_spki', binary, (c) => c.notNull())
          // SHA-256 of the SPKI DER: the clone check (one key, one device) is this unique constraint.
          .addColumn('public_key_sha256', 'text', (c) => c.notNull().unique())
          .addColumn('serial_number', 'text')
          .addColumn('product_id', 'integer', (c) => c.notNull().references('products.id'))
          .addColumn('line_id', 'integer', (c) => c.notNull().references('lines.id'))
          .addColumn('batch_id', 'text', (c) => c.notNull().references('batches.id'))
          .addColumn('tenant', 'text', (c) => c.notNull().references('tenants.name'))
          .addColumn('birth_cert_der', binary)
          .addColumn('state', 'text', (c) => c.notNull().check(sql`state in ('registered', 'provisioned', 'active', 'suspended', 'revoked', 'decommissioned')`))
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addColumn('updated_at', 'text', (c) => c.notNull())
          .addColumn('provisioned_at', 'text')
          .execute();
        await db.schema.createIndex('devices_batch').on('devices').columns(['batch_id', 'udid']).execute();
        await db.schema.createIndex('devices_state').on('devices').columns(['state', 'udid']).execute();
        await db.schema.alterTable('certificates').addColumn('device_udid', 'text').execute();
        await db.schema.createIndex('certificates_device').on('certificates').column('device_udid').execute();
      },
      async down(db: Kysely<unknown>) {
        await db.schema.dropIndex('certificates_device').execute();
        await db.schema.alterTable('certificates').dropColumn('device_udid').execute();
        for (const t of ['devices', 'vendor_cas', 'vendors', 'batches', 'lines', 'products', 'tenants']) await db.schema.dropTable(t).execute();
      },
    },
    '0003_enrolment': {
      async up(db: Kysely<unknown>) {
        // Enrolment policy per product: may the server generate a device's key (EST serverkeygen), and may
        // an operational key differ from the registered hardware key (rekey at re-enrolment, a separate
        // operational key at first enrolment)?
        await db.schema.alterTable('products').addColumn('allow_server_keygen', 'integer', (c) => c.notNull().defaultTo(0)).execute();
        await db.schema.alterTable('products').addColumn('allow_rekey', 'integer', (c) => c.notNull().defaultTo(0)).execute();
        // Claims: batch-scoped, expiring, use-counted enrolment credentials. Only SHA-256(secret) is stored.
        await db.schema.createTable('claims')
          .addColumn('id', 'text', (c) => c.primaryKey())
          .addColumn('batch_id', 'text', (c) => c.notNull().references('batches.id'))
          .addColumn('secret_hash', 'text', (c) => c.notNull())
          .addColumn('max_uses', 'integer', (c) => c.notNull().check(sql`max_uses > 0`))
          .addColumn('used', 'integer', (c) => c.notNull().defaultTo(0))
          .addColumn('per_minute', 'integer', (c) => c.notNull())
          .addColumn('expires_at', 'text', (c) => c.notNull())
          .addColumn('revoked_at', 'text')
          .addColumn('created_by', 'text', (c) => c.notNull())
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addColumn('last_used_at', 'text')
          .addCheckConstraint('claims_use_cap', sql`used <= max_uses`)
          .execute();
        // One row per device that enrolled with a claim: "once each" is this primary key.
        await db.schema.createTable('claim_uses')
          .addColumn('claim_id', 'text', (c) => c.notNull().references('claims.id'))
          .addColumn('udid', 'text', (c) => c.notNull())
          .addColumn('at', 'text', (c) => c.notNull())
          .addPrimaryKeyConstraint('claim_uses_pk', ['claim_id', 'udid'])
          .execute();
        // Batches whose devices' first enrolment waits for an operator (EST answers 202 + Retry-After meanwhile).
        await db.schema.alterTable('batches').addColumn('require_approval', 'integer', (c) => c.notNull().defaultTo(0)).execute();
        await db.schema.createTable('enrolment_approvals')
          .addColumn('id', 'text', (c) => c.primaryKey())
          .addColumn('batch_id', 'text', (c) => c.notNull().references('batches.id'))
          .addColumn('udid', 'text', (c) => c.notNull())
          // The key the device asked with: an approval is for that device with that key only.
          .addColumn('public_key_sha256', 'text', (c) => c.notNull())
          .addColumn('status', 'text', (c) => c.notNull().check(sql`status in ('pending', 'approved', 'rejected', 'used')`))
          .addColumn('authenticator', 'text', (c) => c.notNull())
          .addColumn('source', 'text', (c) => c.notNull())
          .addColumn('requested_at', 'text', (c) => c.notNull())
          .addColumn('decided_at', 'text')
          .addColumn('decided_by', 'text')
          .addColumn('reason', 'text')
          .execute();
        await db.schema.createIndex('enrolment_approvals_device').on('enrolment_approvals').columns(['udid', 'public_key_sha256']).execute();
        await db.schema.createIndex('enrolment_approvals_status').on('enrolment_approvals').columns(['status', 'requested_at']).execute();
        // Re-enrolment finds the presented certificate by its fingerprint.
        await db.schema.createIndex('certificates_fingerprint').on('certificates').column('fingerprint_sha256').execute();
      },
      async down(db: Kysely<unknown>) {
        await db.schema.dropIndex('certificates_fingerprint').execute();
        await db.schema.dropTable('enrolment_approvals').execute();
        await db.schema.alterTable('batches').dropColumn('require_approval').execute();
        await db.schema.dropTable('claim_uses').execute();
        await db.schema.dropTable('claims').execute();
        await db.schema.alterTable('products').dropColumn('allow_rekey').execute();
        await db.schema.alterTable('products').dropColumn('allow_server_keygen').execute();
      },
    },
    '0004_revocation': {
      async up(db: Kysely<unknown>) {
        // CRLs as issued: full and delta (RFC 5280 §5.2.4), one CRL number sequence per CA shared by both.
        await autoId(db, 'crls')
          .addColumn('ca_id', 'integer', (c) => c.notNull().references('certificate_authorities.id'))
          .addColumn('number', 'integer', (c) => c.notNull())
          .addColumn('kind', 'text', (c) => c.notNull().check(sql`kind in ('full', 'delta')`))
          // Delta CRLs: the full CRL number they build on (the Delta CRL Indicator).
          .addColumn('base_number', 'integer')
          .addColumn('this_update', 'text', (c) => c.notNull())
          .addColumn('next_update', 'text', (c) => c.notNull())
          .addColumn('entries', 'integer', (c) => c.notNull())
          .addColumn('der', binary, (c) => c.notNull())
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addUniqueConstraint('crls_ca_number_unique', ['ca_id', 'number'])
          .execute();
        // What a product's devices may do once connected (JSON: MQTT publish / subscribe topic patterns with {udid}); null: the default policy.
        await db.schema.alterTable('products').addColumn('policy', 'text').execute();
        // Renewal window per product: re-enrolment is allowed once this share of a certificate's lifetime has passed (0: any time).
        await db.schema.alterTable('products').addColumn('renew_after_percent', 'integer', (c) => c.notNull().defaultTo(0)).execute();
        // Webhooks: fleet systems subscribe to events (issued, revoked, expiring, quota-exceeded, clone-detected).
        await db.schema.createTable('webhooks')
          .addColumn('id', 'text', (c) => c.primaryKey())
          .addColumn('url', 'text', (c) => c.notNull())
          // The HMAC key the deliveries are signed with (shown once at creation; never logged).
          .addColumn('secret', 'text', (c) => c.notNull())
          .addColumn('events', 'text', (c) => c.notNull())
          .addColumn('created_by', 'text', (c) => c.notNull())
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addColumn('disabled_at', 'text')
          .execute();
        await autoId(db, 'webhook_deliveries')
          .addColumn('webhook_id', 'text', (c) => c.notNull().references('webhooks.id'))
          // The audit entry the event comes from (events are read from the audit log: durable, ordered, every process).
          .addColumn('audit_seq', 'integer')
          .addColumn('event', 'text', (c) => c.notNull())
          .addColumn('payload', 'text', (c) => c.notNull())
          .addColumn('status', 'text', (c) => c.notNull().check(sql`status in ('pending', 'delivered', 'failed')`))
          .addColumn('attempts', 'integer', (c) => c.notNull().defaultTo(0))
          .addColumn('next_attempt_at', 'text', (c) => c.notNull())
          .addColumn('last_status', 'integer')
          .addColumn('last_error', 'text')
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addColumn('delivered_at', 'text')
          .execute();
        await db.schema.createIndex('webhook_deliveries_due').on('webhook_deliveries').columns(['status', 'next_attempt_at']).execute();
        await db.schema.createIndex('webhook_deliveries_hook').on('webhook_deliveries').columns(['webhook_id', 'id']).execute();
        // Cursors of background readers (the webhook dispatcher's position in the audit log, expiry notices sent).
        await db.schema.createTable('cursors')
          .addColumn('name', 'text', (c) => c.primaryKey())
          .addColumn('value', 'text', (c) => c.notNull())
          .addColumn('updated_at', 'text', (c) => c.notNull())
          .execute();
        // CRL and OCSP read the revoked certificates of one issuer.
        await db.schema.createIndex('certificates_issuer_status').on('certificates').columns(['issuer_id', 'status', 'revoked_at']).execute();
        // The expiry report and the expiring-webhook scan read valid certificates by expiry.
        await db.schema.createIndex('certificates_status_expiry').on('certificates').columns(['status', 'not_after']).execute();
      },
      async down(db: Kysely<unknown>) {
        await db.schema.dropIndex('certificates_status_expiry').execute();
        await db.schema.dropIndex('certificates_issuer_status').execute();
        await db.schema.dropTable('crls').execute();
        await db.schema.dropTable('cursors').execute();
        await db.schema.dropTable('webhook_deliveries').execute();
        await db.schema.dropTable('webhooks').execute();
        await db.schema.alterTable('products').dropColumn('renew_after_percent').execute();
        await db.schema.alterTable('products').dropColumn('policy').execute();
      },
    },
    '0005_stamps': {
      async up(db: Kysely<unknown>) {
        // One `hallmark stamp generate` invocation (and its resumptions): what was asked, where it writes.
        await db.schema.createTable('stamp_runs')
          .addColumn('id', 'text', (c) => c.primaryKey())
          .addColumn('batch_id', 'text', (c) => c.notNull().references('batches.id'))
          .addColumn('requested', 'integer', (c) => c.notNull())
          .addColumn('formats', 'text', (c) => c.notNull())
          .addColumn('out_dir', 'text', (c) => c.notNull())
          // SHA-256 of the factory key's SPKI when the run writes one encrypted archive (--encrypt-to).
          .addColumn('encrypt_to', 'text')
          .addColumn('status', 'text', (c) => c.notNull().check(sql`status in ('running', 'complete')`))
          .addColumn('created_by', 'text', (c) => c.notNull())
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addColumn('completed_at', 'text')
          .execute();
        // One stamped device. `pending` holds the stamp's secrets (device and onboarding keys, PoP secret)
        // encrypted under a key derived from the authority's key store, from the commit that records the
        // certificate until its files are written; then it is cleared. A kill between the two loses nothing.
        await db.schema.createTable('stamps')
          .addColumn('udid', 'text', (c) => c.primaryKey().references('devices.udid'))
          .addColumn('run_id', 'text', (c) => c.notNull().references('stamp_runs.id'))
          .addColumn('batch_id', 'text', (c) => c.notNull().references('batches.id'))
          .addColumn('seq', 'integer', (c) => c.notNull())
          .addColumn('certificate_serial', 'text', (c) => c.notNull())
          .addColumn('pending', binary)
          .addColumn('written_at', 'text')
          // Reported back by the factory (hallmark stamp flashed).
          .addColumn('flashed_at', 'text')
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addUniqueConstraint('stamps_batch_seq_unique', ['batch_id', 'seq'])
          .execute();
        await db.schema.createIndex('stamps_run_pending').on('stamps').columns(['run_id', 'written_at']).execute();
        // Serial numbers are what a label shows: one device per serial.
        await db.schema.createIndex('devices_serial_number').on('devices').column('serial_number').execute();
      },
      async down(db: Kysely<unknown>) {
        await db.schema.dropIndex('devices_serial_number').execute();
        await db.schema.dropTable('stamps').execute();
        await db.schema.dropTable('stamp_runs').execute();
      },
    },
    '0006_stations': {
      async up(db: Kysely<unknown>) {
        // An offline factory station (src/authority/station.ts): a sub-CA whose key lives in a factory's
        // PKCS#11 token (its CA row has key_ref NULL: the online server never signs with it), a batch and
        // its quota, and how far its journal has been imported.
        await db.schema.createTable('stations')
          .addColumn('id', 'text', (c) => c.primaryKey())
          .addColumn('ca_id', 'integer', (c) => c.notNull().unique().references('certificate_authorities.id'))
          .addColumn('line_id', 'integer', (c) => c.notNull().references('lines.id'))
          .addColumn('batch_id', 'text', (c) => c.notNull().unique().references('batches.id'))
          .addColumn('status', 'text', (c) => c.notNull().check(sql`status in ('pending', 'active')`))
          .addColumn('quota', 'integer', (c) => c.notNull())
          .addColumn('valid_until', 'text', (c) => c.notNull())
          .addColumn('key_uri', 'text', (c) => c.notNull())
          .addColumn('subject_base', 'text', (c) => c.notNull())
          .addColumn('device_validity_days', 'integer', (c) => c.notNull())
          // 1: the package lists the batch's registered devices and only their keys may be signed.
          .addColumn('registered_only', 'integer', (c) => c.notNull().defaultTo(0))
          .addColumn('imported_count', 'integer', (c) => c.notNull().defaultTo(0))
          .addColumn('refused_count', 'integer', (c) => c.notNull().defaultTo(0))
          .addColumn('last_seq', 'integer', (c) => c.notNull().defaultTo(0))
          .addColumn('last_import_at', 'text')
          .addColumn('created_by', 'text', (c) => c.notNull())
          .addColumn('created_at', 'text', (c) => c.notNull())
          .addColumn('installed_at', 'text')
          .execute();
        // Every imported journal entry, by its sequence number: a journal imported again imports nothing,
        // and an entry rewritten after its import (another certificate under the same number) is caught.
        await db.schema.createTable('station_entries')
          .addColumn('station_id', 'text', (c) => c.notNull().references('stations.id'))
          .addColumn('seq', 'integer', (c) => c.notNull())
          .addColumn('serial', 'text', (c) => c.notNull())
          .addColumn('fingerprint_sha256', 'text', (c) => c.notNull())
          .addColumn('udid', 'text', (c) => c.notNull())
          .addColumn('signed_at', 'text', (c) => c.notNull())
          .addColumn('imported_at', 'text', (c) => c.notNull())
          .addPrimaryKeyConstraint('station_entries_pk', ['station_id', 'seq'])
          .execute();
      },
      async down(db: Kysely<unknown>) {
        await db.schema.dropTable('station_entries').execute();
        await db.schema.dropTable('stations').execute();
      },
    },
    '0007_est_indexes': {
      // Fewer random-key index writes per issued certificate (EST enrolment, docs/benchmarks.md): every
      // insert into an index on a random key (serial, fingerprint) dirties its own page, which the commit
      // writes to the WAL and the checkpoint to the file again (~10 µs of CPU and 4 KiB each).
      // - certificates_fingerprint goes: its only reader (re-enrolment) now finds the presented
      //   certificate by its serial and compares the whole DER.
      // - unique (issuer_id, serial) becomes unique (serial, issuer_id), which also serves lookups by
      //   serial alone, so certificates_serial goes too. SQLite cannot drop a table constraint: the table
      //   is rebuilt (in one transaction; a large store takes a while, once).
      async up(db: Kysely<unknown>) {
        if (dialect === 'postgres') {
          await sql`drop index if exists certificates_fingerprint`.execute(db);
          await sql`create unique index certificates_serial_issuer_unique on certificates (serial, issuer_id)`.execute(db);
          await sql`alter table certificates drop constraint certificates_issuer_serial_unique`.execute(db);
          await sql`drop index if exists certificates_serial`.execute(db);
          return;
        }
        await rebuildSqliteCertificates(db, {
          from: 'constraint "certificates_issuer_serial_unique" unique ("issuer_id", "serial")',
          to: 'constraint "certificates_serial_issuer_unique" unique ("serial", "issuer_id")',
          dropIndexes: ['certificates_serial', 'certificates_fingerprint'],
        });
      },
      async down(db: Kysely<unknown>) {
        if (dialect === 'postgres') {
          await sql`create index certificates_serial on certificates (serial)`.execute(db);
          await sql`alter table certificates add constraint certificates_issuer_serial_unique unique (issuer_id, serial)`.execute(db);
          await sql`drop index certificates_serial_issuer_unique`.execute(db);
          await sql`create index certificates_fingerprint on certificates (fingerprint_sha256)`.execute(db);
          return;
        }
        await rebuildSqliteCertificates(db, {
          from: 'constraint "certificates_serial_issuer_unique" unique ("serial", "issuer_id")',
          to: 'constraint "certificates_issuer_serial_unique" unique ("issuer_id", "serial")',
          dropIndexes: [],
          createIndexes: ['create index "certificates_serial" on "certificates" ("serial")', 'create index "certificates_fingerprint" on "certificates" ("fingerprint_sha256")'],
        });
      },
    },
    '0008_device_indexes': {
      // devices_batch (batch_id, udid) and devices_state (state, udid) put every new device at a random
      // place in two more indexes (the UDID is random), so each one dirtied two more pages that the commit
      // writes to the WAL and the checkpoint again. No query pages or sorts by UDID within a batch or a
      // state, so the UDID goes from both: an index on (batch_id) or (state) keeps its entries in row
      // order, and new devices land on the same last page. Measured on a 50,000-stamp run: 54.5 → 39.3 KiB
      // written per stamp (stamp files included).
      async up(db: Kysely<unknown>) {
        await sql`drop index devices_batch`.execute(db);
        await sql`drop index devices_state`.execute(db);
        await sql`create index devices_batch on devices (batch_id)`.execute(db);
        await sql`create index devices_state on devices (state)`.execute(db);
      },
      async down(db: Kysely<unknown>) {
        await sql`drop index devices_batch`.execute(db);
        await sql`drop index devices_state`.execute(db);
        await sql`create index devices_batch on devices (batch_id, udid)`.execute(db);
        await sql`create index devices_state on devices (state, udid)`.execute(db);
      },
    },
    '0009_stamp_run_archive_and_owner': {
      // An encrypted stamp run names its archive (and the archive's SHA-256) in the store before the
      // archive is renamed into place, so that an invocation killed between that rename and the run's
      // last commit is finished from that archive on the next one instead of writing every stamp again
      // into a second part. A run also names the process making it (owner, heartbeat at every chunk), so
      // that a second `stamp generate` for the batch is refused while the first is alive instead of
      // colliding with it.
      async up(db: Kysely<unknown>) {
        await sql`alter table stamp_runs add column archive_name text`.execute(db);
        await sql`alter table stamp_runs add column archive_sha256 text`.execute(db);
        await sql`alter table stamp_runs add column owner text`.execute(db);
        await sql`alter table stamp_runs add column heartbeat_at text`.execute(db);
      },
      async down(db: Kysely<unknown>) {
        await sql`alter table stamp_runs drop column heartbeat_at`.execute(db);
        await sql`alter table stamp_runs drop column owner`.execute(db);
        await sql`alter table stamp_runs drop column archive_sha256`.execute(db);
        await sql`alter table stamp_runs drop column archive_name`.execute(db);
      },
    },
  };
}

export class StaticMigrationProvider implements MigrationProvider {
  readonly #dialect: Dialect;
  constructor(dialect: Dialect) { this.#dialect = dialect; }
  async getMigrations(): Promise<Record<string, Migration>> { return migrations(this.#dialect); }
}

/**
 * SQLite cannot change a table constraint in place: rebuilds `certificates` with the constraint text
 * `from` replaced by `to` (SQLite's documented procedure: new table, copy, drop, rename, indexes again),
 * in one IMMEDIATE transaction. The AUTOINCREMENT high-water mark is kept (ids are never reused). Does
 * nothing when the table no longer has `from` (another process did it first).
 */
async function rebuildSqliteCertificates(db: Kysely<unknown>, change: { from: string; to: string; dropIndexes: readonly string[]; createIndexes?: readonly string[] }): Promise<void> {
  await sql`begin immediate`.execute(db);
  try {
    const table = (await sql<{ sql: string }>`select sql from sqlite_master where type = 'table' and name = 'certificates'`.execute(db)).rows[0];
    if (!table || !table.sql.includes(change.from)) {
      await sql`commit`.execute(db);
      return;
    }
    const create = table.sql.replace(change.from, change.to).replace(/^create table "certificates"/i, 'create table "certificates_rebuilt"');
    if (!create.startsWith('create table "certificates_rebuilt"')) throw new Error(`unexpected definition of table certificates: ${table.sql.slice(0, 60)}`);
    const indexes = (await sql<{ name: string; sql: string }>`select name, sql from sqlite_master where type = 'index' and tbl_name = 'certificates' and sql is not null`.execute(db)).rows
      .filter((i) => !change.dropIndexes.includes(i.name));
    const triggers = (await sql<{ sql: string }>`select sql from sqlite_master where type = 'trigger' and tbl_name = 'certificates'`.execute(db)).rows;
    const seq = (await sql<{ seq: number }>`select seq from sqlite_sequence where name = 'certificates'`.execute(db)).rows[0]?.seq;
    await sql.raw(create).execute(db);
    await sql`insert into certificates_rebuilt select * from certificates`.execute(db);
    const copied = (await sql<{ seq: number }>`select seq from sqlite_sequence where name = 'certificates_rebuilt'`.execute(db)).rows[0]?.seq;
    if (seq !== undefined || copied !== undefined) {
      await sql`delete from sqlite_sequence where name = 'certificates_rebuilt'`.execute(db);
      await sql`insert into sqlite_sequence (name, seq) values ('certificates_rebuilt', ${Math.max(Number(seq ?? 0), Number(copied ?? 0))})`.execute(db);
    }
    await sql`drop table certificates`.execute(db);
    await sql`alter table certificates_rebuilt rename to certificates`.execute(db);
    for (const i of indexes) await sql.raw(i.sql).execute(db);
    for (const c of change.createIndexes ?? []) await sql.raw(c).execute(db);
    for (const t of triggers) await sql.raw(t.sql).execute(db);
    await sql`commit`.execute(db);
  } catch (err) {
    await sql`rollback`.execute(db).catch(() => {});
    throw err;
  }
}
