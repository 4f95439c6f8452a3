import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { test } from 'node:test';
import { sql } from 'kysely';
import { verifyAuditLog } from '../../src/audit/audit-log.js';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { CertificateRecorder } from '../../src/store/certificate-recorder.js';
import { Store, nowIso, redactUrl } from '../../src/store/database.js';
import type { NewCertificateRow } from '../../src/store/schema.js';
import { forEachDialect } from '../helpers/db.js';
import { tempDirFor } from '../helpers/tmp.js';
import { hasCode } from '../helpers/assertions.js';


/** A raw unique-constraint violation from either driver. */
const isUniqueViolation = (err: unknown): boolean => {
  const e = err as { code?: string };
  assert.ok(e.code === '23505' || e.code === 'SQLITE_CONSTRAINT_UNIQUE', `expected a unique violation, got ${String(err)} (${e.code})`);
  return true;
};

async function insertCa(store: Store, name: string): Promise<number> {
  const now = nowIso();
  await store.db.insertInto('certificate_authorities').values({
    name, role: 'intermediate', parent_id: null, status: 'active', subject: `CN=${name}`, key_ref: null, key_algorithm: 'ecdsa-p256',
    ski: randomBytes(20).toString('hex'), path_len: null, certificate_der: null, csr_der: null, serial: null, not_before: null, not_after: null,
    created_at: now, updated_at: now,
  }).execute();
  const row = await store.db.selectFrom('certificate_authorities').select('id').where('name', '=', name).executeTakeFirstOrThrow();
  return Number(row.id);
}

function certRow(issuerId: number, serial = randomBytes(16).toString('hex')): NewCertificateRow {
  const now = nowIso();
  return {
    issuer_id: issuerId, serial, profile: 'device', subject: `CN=${serial}`, fingerprint_sha256: randomBytes(32).toString('hex'),
    not_before: now, not_after: nowIso(new Date(Date.now() + 86_400_000)), der: randomBytes(64), status: 'valid',
    revoked_at: null, revocation_reason: null, requested_by: 'test', created_at: now,
  };
}

const countCerts = async (store: Store, issuerId: number): Promise<number> =>
  Number((await store.db.selectFrom('certificates').select((eb) => eb.fn.countAll().as('n')).where('issuer_id', '=', issuerId).executeTakeFirstOrThrow()).n);

forEachDialect('store', async (t, target) => {
  const store = await target.openStore();
  assert.equal(store.dialect, target.dialect);

  await t.test('migrations are idempotent: opening an up-to-date database again changes nothing', async () => {
    const caId = await insertCa(store, 'migrations');
    await store.db.insertInto('certificates').values(certRow(caId, 'aa01')).execute();
    const again = await target.openStore();
    await again.migrate();
    const third = await target.openStore();
    const migrations = await sql<{ name: string }>`select name from kysely_migration order by name`.execute(third.db);
    assert.deepEqual(migrations.rows.map((r) => r.name), ['0001_foundation', '0002_registry', '0003_enrolment', '0004_revocation', '0005_stamps', '0006_stations', '0007_est_indexes', '0008_device_indexes', '0009_stamp_run_archive_and_owner']);
    assert.equal(await countCerts(third, caId), 1);
    await again.close();
    await third.close();
  });

  await t.test('(issuer_id, serial) is unique; the same serial under another issuer is fine', async () => {
    const a = await insertCa(store, 'unique-a');
    const b = await insertCa(store, 'unique-b');
    await store.db.insertInto('certificates').values(certRow(a, '0badc0de')).execute();
    await assert.rejects(store.db.insertInto('certificates').values(certRow(a, '0badc0de')).execute(), isUniqueViolation);
    await store.db.insertInto('certificates').values(certRow(b, '0badc0de')).execute();
    assert.equal(await countCerts(store, a), 1);
    assert.equal(await countCerts(store, b), 1);
  });

  await t.test('a failed writeTransaction leaves nothing behind', async () => {
    const caId = await insertCa(store, 'rollback');
    await store.db.insertInto('certificates').values(certRow(caId, 'dd')).execute();
    await assert.rejects(store.writeTransaction(async (trx) => {
      await trx.insertInto('certificates').values(certRow(caId, 'ee')).execute();
      await trx.insertInto('certificates').values(certRow(caId, 'dd')).execute();
    }), isUniqueViolation);
    assert.equal(await countCerts(store, caId), 1);
    // The store is usable afterwards (the lock was released, the connection is not stuck in a transaction).
    await store.writeTransaction((trx) => trx.insertInto('certificates').values(certRow(caId, 'ff')).execute());
    assert.equal(await countCerts(store, caId), 2);
  });

  await t.test('CertificateRecorder: 500 concurrent records are all committed, in few transactions', async () => {
    const caId = await insertCa(store, 'recorder-500');
    const recorder = new CertificateRecorder(store);
    const rows = Array.from({ length: 500 }, () => certRow(caId));
    await Promise.all(rows.map((row) => recorder.record(row, { actor: 'test', action: 'certificate.issue', target: row.serial, details: { n: 1 } })));
    assert.equal(await countCerts(store, caId), 500);
    const stored = await store.db.selectFrom('certificates').select(['serial', 'der']).where('issuer_id', '=', caId).execute();
    const bySerial = new Map(stored.map((r) => [r.serial, Buffer.from(r.der)]));
    for (const row of rows) assert.ok(bySerial.get(row.serial)?.equals(row.der as Buffer), row.serial);
    const audit = await store.db.selectFrom('audit_log').select(['target', 'at']).where('action', '=', 'certificate.issue').execute();
    const mine = audit.filter((a) => bySerial.has(a.target));
    assert.equal(mine.length, 500);
    // One audit timestamp per transaction: group commit wrote 500 records in a handful of transactions.
    const transactions = new Set(mine.map((a) => a.at)).size;
    assert.ok(transactions <= 10, `${transactions} transactions for 500 records`);
    const verdict = await verifyAuditLog(store.db);
    assert.ok(verdict.ok, JSON.stringify(verdict));
  });

  await t.test('a unique violation in a batch rejects only the offending record, with SERIAL_COLLISION', async () => {
    const caId = await insertCa(store, 'recorder-collision');
    await store.db.insertInto('certificates').values(certRow(caId, 'c0111de5')).execute();
    const recorder = new CertificateRecorder(store);
    const auditBefore = await auditCount(store);
    const rows = Array.from({ length: 20 }, (_, i) => certRow(caId, i === 7 ? 'c0111de5' : undefined));
    // Two records of the same batch with the same serial: the second one loses.
    rows.push(certRow(caId, 'beef01'), certRow(caId, 'beef01'));
    const results = await Promise.allSettled(rows.map((row) => recorder.record(row, { actor: 'test', action: 'certificate.issue', target: row.serial })));
    const rejected = results.flatMap((r, i) => (r.status === 'rejected' ? [[i, r.reason] as const] : []));
    assert.deepEqual(rejected.map(([i]) => i), [7, 21]);
    for (const [, reason] of rejected) hasCode('SERIAL_COLLISION')(reason);
    assert.equal(await countCerts(store, caId), 1 + 19 + 1);
    assert.equal(await auditCount(store), auditBefore + 20, 'one audit entry per committed record, none for the rejected ones');
    const verdict = await verifyAuditLog(store.db);
    assert.ok(verdict.ok, JSON.stringify(verdict));
  });

  await t.test('the recorder keeps working after a collision', async () => {
    const caId = await insertCa(store, 'recorder-after');
    const recorder = new CertificateRecorder(store);
    await recorder.record(certRow(caId, '01'), { actor: 'test', action: 'certificate.issue', target: '01' });
    await assert.rejects(recorder.record(certRow(caId, '01'), { actor: 'test', action: 'certificate.issue', target: '01' }), hasCode('SERIAL_COLLISION'));
    await recorder.record(certRow(caId, '02'), { actor: 'test', action: 'certificate.issue', target: '02' });
    assert.equal(await countCerts(store, caId), 2);
  });
});

async function auditCount(store: Store): Promise<number> {
  return Number((await store.db.selectFrom('audit_log').select((eb) => eb.fn.countAll().as('n')).executeTakeFirstOrThrow()).n);
}

test('unreachable PostgreSQL -> DATABASE_UNAVAILABLE, without the password in the message', async () => {
  await assert.rejects(Store.open({ url: 'postgres://postgres@127.0.0.1:1/x' }), hasCode('DATABASE_UNAVAILABLE'));
  await assert.rejects(Store.open({ url: 'postgres://hallmark:s3cret-pw@127.0.0.1:1/x' }), (err) => {
    hasCode('DATABASE_UNAVAILABLE')(err);
    assert.doesNotMatch((err as Error).message, /s3cret-pw/);
    return true;
  });
  assert.equal(redactUrl('postgresql://hallmark:s3cret-pw@db.example:5432/ca'), 'postgresql://hallmark:***@db.example:5432/ca');
});

test('a SQLite file that cannot be created -> DATABASE_UNAVAILABLE', async (t) => {
  const dir = await tempDirFor(t);
  await assert.rejects(Store.open({ url: join(dir, 'no', 'such', 'dir', 'hallmark.db') }), hasCode('DATABASE_UNAVAILABLE'));
});
