// Migration 0007_est_indexes: the certificates table loses its fingerprint index and its separate
// serial index; uniqueness becomes (serial, issuer_id), which serves lookups by serial alone. Existing
// rows, their ids and the AUTOINCREMENT high-water mark survive the SQLite table rebuild, and down()
// restores the previous shape.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { Migrator, sql } from 'kysely';
import { nowIso, type Store } from '../../src/store/database.js';
import { StaticMigrationProvider } from '../../src/store/migrations.js';
import type { NewCertificateRow } from '../../src/store/schema.js';
import { forEachDialect } from '../helpers/db.js';

async function insertCa(store: Store, name: string): Promise<number> {
  const now = nowIso();
  await store.db.insertInto('certificate_authorities').values({
    name, role: 'intermediate', parent_id: null, status: 'active', subject: `CN=${name}`, key_ref: null, key_algorithm: 'ecdsa-p256',
    ski: randomBytes(20).toString('hex'), path_len: null, certificate_der: null, csr_der: null, serial: null, not_before: null, not_after: null,
    created_at: now, updated_at: now,
  }).execute();
  return Number((await store.db.selectFrom('certificate_authorities').select('id').where('name', '=', name).executeTakeFirstOrThrow()).id);
}

const row = (issuerId: number, serial: string): NewCertificateRow => {
  const now = nowIso();
  return {
    issuer_id: issuerId, serial, profile: 'device', subject: `CN=${serial}`, fingerprint_sha256: randomBytes(32).toString('hex'), not_before: now,
    not_after: now, der: randomBytes(40), status: 'valid', revoked_at: null, revocation_reason: null, requested_by: 'test', created_at: now,
  };
};

async function certificateIndexes(store: Store): Promise<string[]> {
  const rows = store.dialect === 'postgres'
    ? (await sql<{ name: string }>`select indexname as name from pg_indexes where tablename = 'certificates'`.execute(store.db)).rows
    : (await sql<{ name: string }>`select name from sqlite_master where type = 'index' and tbl_name = 'certificates' and sql is not null`.execute(store.db)).rows;
  return rows.map((r) => r.name).sort();
}

const isUnique = (err: unknown): boolean => {
  const e = err as { code?: string };
  assert.ok(e.code === '23505' || e.code === 'SQLITE_CONSTRAINT_UNIQUE', `expected a unique violation, got ${String(err)}`);
  return true;
};

forEachDialect('migration 0007_est_indexes', async (t, target) => {
  const store = await target.openStore();
  const migrator = new Migrator({ db: store.db, provider: new StaticMigrationProvider(store.dialect) });

  await t.test('down to 0006: the fingerprint and serial indexes and unique (issuer_id, serial) are back', async () => {
    const r = await migrator.migrateTo('0006_stations');
    assert.equal(r.error, undefined, String(r.error));
    const indexes = await certificateIndexes(store);
    assert.ok(indexes.includes('certificates_fingerprint') && indexes.includes('certificates_serial'), indexes.join(', '));
  });

  const a = await insertCa(store, 'ca-a');
  const b = await insertCa(store, 'ca-b');
  await store.db.insertInto('certificates').values([row(a, '01'), row(a, '02'), row(b, '01'), row(a, '03')]).execute();
  await store.db.deleteFrom('certificates').where('serial', '=', '03').execute(); // the high-water mark is now above max(id)
  const before = await store.db.selectFrom('certificates').selectAll().orderBy('id').execute();
  const highest = Number((await store.db.selectFrom('certificates').select('id').where('serial', '=', '01').where('issuer_id', '=', b).executeTakeFirstOrThrow()).id) + 1;

  await t.test('up: rows and ids kept, two indexes fewer, uniqueness per issuer still enforced', async () => {
    const r = await migrator.migrateToLatest();
    assert.equal(r.error, undefined, String(r.error));
    assert.deepEqual(await store.db.selectFrom('certificates').selectAll().orderBy('id').execute(), before);
    const indexes = await certificateIndexes(store);
    assert.ok(!indexes.includes('certificates_fingerprint') && !indexes.includes('certificates_serial'), indexes.join(', '));
    for (const kept of ['certificates_not_after', 'certificates_device', 'certificates_issuer_status', 'certificates_status_expiry']) assert.ok(indexes.includes(kept), `${kept} kept: ${indexes.join(', ')}`);
    await assert.rejects(store.db.insertInto('certificates').values(row(a, '02')).execute(), isUnique);
    await store.db.insertInto('certificates').values(row(b, '02')).execute(); // the same serial from another issuer
    // ids are never reused (SQLite AUTOINCREMENT / PostgreSQL sequence)
    const id = Number((await store.db.selectFrom('certificates').select('id').where('serial', '=', '02').where('issuer_id', '=', b).executeTakeFirstOrThrow()).id);
    assert.ok(id > highest, `new id ${id} above the old high-water mark ${highest}`);
  });

  if (target.dialect === 'sqlite') {
    await t.test('lookups by serial, and by issuer and serial, use the new unique index', async () => {
      for (const q of [sql`explain query plan select * from certificates where serial = ${'02'}`, sql`explain query plan select status from certificates where issuer_id = ${a} and serial = ${'02'}`]) {
        const plan = (await q.execute(store.db)).rows.map((r) => (r as { detail: string }).detail).join('; ');
        assert.match(plan, /USING INDEX sqlite_autoindex_certificates/, plan);
      }
      const table = (await sql<{ sql: string }>`select sql from sqlite_master where name = 'certificates'`.execute(store.db)).rows[0]!.sql;
      assert.match(table, /constraint "certificates_serial_issuer_unique" unique \("serial", "issuer_id"\)/);
    });
  }

  await t.test('down and up again round-trip', async () => {
    assert.equal((await migrator.migrateTo('0006_stations')).error, undefined);
    assert.ok((await certificateIndexes(store)).includes('certificates_fingerprint'));
    await assert.rejects(store.db.insertInto('certificates').values(row(b, '02')).execute(), isUnique);
    assert.equal((await migrator.migrateToLatest()).error, undefined);
    assert.equal((await store.db.selectFrom('certificates').select('id').execute()).length, 4);
  });
});
