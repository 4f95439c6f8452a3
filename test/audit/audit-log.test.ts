import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { Worker } from 'node:worker_threads';
import { sql } from 'kysely';
import { GENESIS_HASH, appendAudit, listAudit, verifyAuditLog, type AuditVerdict } from '../../src/audit/audit-log.js';
import type { Store } from '../../src/store/database.js';
import type { AuditRow } from '../../src/store/schema.js';
import { forEachDialect } from '../helpers/db.js';

const event = (n: number, actor = 'cli:alice') => ({ actor, action: 'certificate.issue', target: `serial-${n}`, details: { n, subject: `CN=device ${n}`, ok: true } });

async function rows(store: Store): Promise<AuditRow[]> {
  return (await store.db.selectFrom('audit_log').selectAll().orderBy('seq').execute()).map((r) => ({ ...r, seq: Number(r.seq) }));
}

async function row(store: Store, seq: number): Promise<AuditRow> {
  const r = await store.db.selectFrom('audit_log').selectAll().where('seq', '=', seq).executeTakeFirstOrThrow();
  return { ...r, seq: Number(r.seq) };
}

/** Writes a row's columns back exactly (raw SQL, as someone with database access would). */
async function putRow(store: Store, r: AuditRow): Promise<void> {
  await sql`update audit_log set at = ${r.at}, actor = ${r.actor}, action = ${r.action}, target = ${r.target}, details = ${r.details}, prev_hash = ${r.prev_hash}, hash = ${r.hash} where seq = ${r.seq}`.execute(store.db);
}

function assertBroken(verdict: AuditVerdict, seq: number, reason: RegExp): void {
  assert.equal(verdict.ok, false, `expected a broken chain at ${seq}, got ${JSON.stringify(verdict)}`);
  assert.equal((verdict as { seq: number }).seq, seq, JSON.stringify(verdict));
  assert.match((verdict as { reason: string }).reason, reason);
  assert.equal(verdict.entries, seq - 1, 'entries verified before the break');
}

forEachDialect('audit log', async (t, target) => {
  const store = await target.openStore();

  // 20 entries: 10 one per transaction, then two transactions of 5.
  for (let n = 1; n <= 10; n++) await store.writeTransaction((trx) => appendAudit(trx, [event(n)]));
  await store.writeTransaction((trx) => appendAudit(trx, [11, 12, 13, 14, 15].map((n) => event(n))));
  await store.writeTransaction((trx) => appendAudit(trx, [16, 17, 18, 19, 20].map((n) => event(n, 'token:t1'))));
  const original = await rows(store);

  /** Runs a tampering, then puts the original rows back and checks the chain verifies again. */
  async function tampered(what: () => Promise<void>, check: (v: AuditVerdict) => void | Promise<void>): Promise<void> {
    await what();
    try {
      await check(await verifyAuditLog(store.db));
    } finally {
      await sql`delete from audit_log`.execute(store.db);
      await store.db.insertInto('audit_log').values(original).execute();
    }
    assert.equal((await verifyAuditLog(store.db)).ok, true, 'restored chain verifies');
  }

  await t.test('20 appended entries verify, in order, chained from the genesis hash', async () => {
    const verdict = await verifyAuditLog(store.db);
    assert.deepEqual(verdict, { ok: true, entries: 20, headHash: original[19]!.hash });
    assert.deepEqual(original.map((r) => r.seq), Array.from({ length: 20 }, (_, i) => i + 1));
    assert.equal(original[0]!.prev_hash, GENESIS_HASH);
    for (let i = 1; i < 20; i++) assert.equal(original[i]!.prev_hash, original[i - 1]!.hash);
    const listed = await listAudit(store.db, { after: 15, limit: 3 });
    assert.deepEqual(listed.map((e) => e.seq), [16, 17, 18]);
    assert.deepEqual(listed[0]!.details, { n: 16, subject: 'CN=device 16', ok: true });
    assert.equal(listed[0]!.actor, 'token:t1');
    assert.equal((await verifyAuditLog(store.db, 3)).entries, 20, 'pages smaller than the log');
  });

  await t.test('one byte of one entry\'s details changed -> fails naming that seq', async () => {
    const r = original[6]!;
    assert.equal(r.seq, 7);
    await tampered(
      () => sql`update audit_log set details = ${r.details.replace('"n":7', '"n":8')} where seq = 7`.execute(store.db).then(() => undefined),
      (v) => assertBroken(v, 7, /entry 7 was changed/),
    );
  });

  await t.test('actor, action, target or timestamp changed -> fails naming that seq', async () => {
    for (const [column, seq] of [['actor', 2], ['action', 3], ['target', 18], ['at', 20]] as const) {
      const r = await row(store, seq);
      await tampered(() => putRow(store, { ...r, [column]: `${r[column]}x` }), (v) => assertBroken(v, seq, /was changed/));
    }
  });

  await t.test('an entry deleted -> fails naming the missing seq', async () => {
    await tampered(
      () => sql`delete from audit_log where seq = 12`.execute(store.db).then(() => undefined),
      (v) => assertBroken(v, 12, /entry 12 is missing/),
    );
    // Also when the gap falls on a page boundary.
    await tampered(
      () => sql`delete from audit_log where seq = 4`.execute(store.db).then(() => undefined),
      async () => assertBroken(await verifyAuditLog(store.db, 3), 4, /entry 4 is missing/),
    );
  });

  await t.test('two entries\' contents swapped -> fails', async () => {
    const [a, b] = [await row(store, 4), await row(store, 5)];
    // Contents swapped, each keeping its seq and hashes.
    const content = (r: AuditRow) => ({ at: r.at, actor: r.actor, action: r.action, target: r.target, details: r.details });
    await tampered(async () => {
      await putRow(store, { ...a, ...content(b) });
      await putRow(store, { ...b, ...content(a) });
    }, (v) => assertBroken(v, 4, /entry 4/));
    // Whole rows swapped, hashes and all (only seq kept): the chain links no longer follow.
    await tampered(async () => {
      await putRow(store, { ...b, seq: 4 });
      await putRow(store, { ...a, seq: 5 });
    }, (v) => assertBroken(v, 4, /does not follow/));
  });

  await t.test('an entry rewritten with a matching hash of its own still breaks the link to the next', async () => {
    const r = await row(store, 15);
    const details = r.details.replace('"ok":true', '"ok":false');
    const hash = createHash('sha256').update(r.prev_hash).update('\n').update(JSON.stringify([r.seq, r.at, r.actor, r.action, r.target, details])).digest('hex');
    await tampered(() => putRow(store, { ...r, details, hash }), (v) => assertBroken(v, 16, /entry 16 does not follow entry 15/));
  });

  await t.test('a removed tail shows only as a shorter chain with an older head hash', async () => {
    await tampered(
      () => sql`delete from audit_log where seq = 20`.execute(store.db).then(() => undefined),
      (v) => assert.deepEqual(v, { ok: true, entries: 19, headHash: original[18]!.hash }),
    );
  });

  await t.test('concurrent appends from two Store instances stay one valid chain', async () => {
    const a = await target.openStore();
    const b = await target.openStore();
    const started = Date.now();
    const writes: Promise<void>[] = [];
    for (let n = 0; n < 25; n++) {
      for (const [s, actor] of [[a, 'store-a'], [b, 'store-b']] as const) {
        writes.push(s.writeTransaction(async (trx) => {
          await appendAudit(trx, [event(100 + n, actor)]);
          await new Promise((resolve) => setImmediate(resolve)); // hold the lock across a turn of the event loop
          await appendAudit(trx, [event(200 + n, actor)]);
        }));
      }
    }
    await Promise.all(writes);
    assert.ok(Date.now() - started < 5000, `took ${Date.now() - started} ms`);
    const verdict = await verifyAuditLog(store.db);
    assert.equal(verdict.ok, true, JSON.stringify(verdict));
    assert.equal(verdict.entries, 20 + 100);
    // Each transaction's two entries are adjacent: transactions did not interleave.
    const all = await rows(store);
    for (let i = 20; i < all.length; i += 2) {
      assert.equal(all[i]!.actor, all[i + 1]!.actor);
      assert.equal(JSON.parse(all[i + 1]!.details).n, JSON.parse(all[i]!.details).n + 100);
    }
    await a.close();
    await b.close();
  });
});

// Before the fix, a second Store on the same SQLite file in the same process blocked the event loop in
// better-sqlite3's busy handler while the first held the write lock: a deadlock until SQLITE_BUSY (~10 s).
forEachDialect('two Store instances on one SQLite file do not deadlock on the write lock', async (t, target) => {
  const a = await target.openStore();
  const b = await target.openStore();
  const started = Date.now();
  let release!: () => void;
  const held = new Promise<void>((resolve) => { release = resolve; });
  const first = a.writeTransaction(async (trx) => {
    await appendAudit(trx, [event(1, 'a')]);
    await held; // keep the lock until b has asked for it
    await appendAudit(trx, [event(2, 'a')]);
  });
  const second = b.writeTransaction((trx) => appendAudit(trx, [event(3, 'b')]));
  setTimeout(release, 50);
  await Promise.all([first, second]);
  assert.ok(Date.now() - started < 2000, `took ${Date.now() - started} ms`);
  const verdict = await verifyAuditLog(a.db);
  assert.deepEqual([verdict.ok, verdict.entries], [true, 3]);
  assert.deepEqual((await rows(a)).map((r) => r.actor), ['a', 'a', 'b']);

  await t.test('appends from two threads (as from two processes) stay one valid chain', async () => {
    const code = `
      const { workerData, parentPort } = require('node:worker_threads');
      (async () => {
        const { Store } = await import(workerData.database);
        const { appendAudit } = await import(workerData.audit);
        const store = await Store.open({ url: workerData.url });
        for (let n = 0; n < 40; n++) {
          await store.writeTransaction((trx) => appendAudit(trx, [{ actor: workerData.actor, action: 'test.append', target: String(n) }]));
        }
        await store.close();
        parentPort.postMessage('done');
      })().catch((err) => parentPort.postMessage('error: ' + (err && err.stack || err)));
    `;
    const run = (actor: string) => new Promise<void>((resolve, reject) => {
      const worker = new Worker(code, {
        eval: true,
        workerData: {
          actor,
          url: target.url,
          database: new URL('../../src/store/database.js', import.meta.url).href,
          audit: new URL('../../src/audit/audit-log.js', import.meta.url).href,
        },
      });
      worker.once('message', (m: string) => (m === 'done' ? resolve() : reject(new Error(m))));
      worker.once('error', reject);
    });
    await Promise.all([run('worker-1'), run('worker-2')]);
    const verdict = await verifyAuditLog(a.db);
    assert.deepEqual([verdict.ok, verdict.entries], [true, 3 + 80], JSON.stringify(verdict));
  });
}, { dialects: ['sqlite'] });
