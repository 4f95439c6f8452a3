// Store.commit: procedures in group commits — in the SQLite writer thread (writeInBackground) and in
// this thread on PostgreSQL. Grouping, a refusal rolling back only its unit, a failing COMMIT rejecting
// every unit of its group, errors and bytes crossing the thread boundary intact, a crashed writer
// rejecting what it held and being replaced, close() finishing the queued units first, and the serving
// connection's own write transactions not starving behind the writer.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { sql } from 'kysely';
import { verifyAuditLog } from '../../src/audit/audit-log.js';
import { HallmarkError } from '../../src/errors.js';
import { Store, nowIso } from '../../src/store/database.js';
import { forEachDialect } from '../helpers/db.js';
import { hasCode } from '../helpers/assertions.js';
import { ADD_TENANT, BYTES, CHILD, CRASH, DANGLING, SLOW } from './writer-fixture.js';

const tenantsLike = async (store: Store, prefix: string): Promise<string[]> =>
  (await store.db.selectFrom('tenants').select('name').where('name', 'like', `${prefix}%`).execute()).map((r) => r.name).sort();

forEachDialect('store commit (writer thread on SQLite)', async (t, target) => {
  const store = await target.openStore();
  store.writeInBackground();
  if (target.dialect === 'sqlite') assert.ok(store.writer, 'a file SQLite store runs a writer thread');
  else assert.equal(store.writer, undefined, 'PostgreSQL commits in this thread');
  // A parent table and a child whose foreign key is checked only at COMMIT.
  await sql`create table writer_parent (id integer primary key)`.execute(store.db);
  await sql`create table writer_child (id integer primary key, parent_id integer references writer_parent (id) deferrable initially deferred)`.execute(store.db);
  await sql`insert into writer_parent (id) values (1)`.execute(store.db);

  await t.test('concurrent units share commits; a refusal rolls back only its unit; audit entries only for the committed', async () => {
    const outcomes = await Promise.allSettled(Array.from({ length: 60 }, (_, i) => store.commit(ADD_TENANT, { name: `g-${String(i).padStart(2, '0')}`, refuse: i % 7 === 3 })));
    const committed = outcomes.flatMap((o) => (o.status === 'fulfilled' ? [o.value] : [])).sort();
    assert.equal(committed.length, 60 - 9);
    for (const [i, o] of outcomes.entries()) {
      if (i % 7 !== 3) continue;
      assert.equal(o.status, 'rejected');
      const err = (o as PromiseRejectedResult).reason as HallmarkError;
      // The procedure's own error, rebuilt on this side of the thread boundary with its extra fields.
      assert.ok(err instanceof HallmarkError, String(err));
      assert.equal(err.code, 'QUOTA_EXCEEDED');
      assert.equal(err.status, 409);
      assert.equal((err as unknown as { retryAfterSeconds: number }).retryAfterSeconds, 7);
    }
    assert.deepEqual(await tenantsLike(store, 'g-'), committed);
    const audited = (await store.db.selectFrom('audit_log').select('target').where('action', '=', 'tenant.add').execute()).map((r) => r.target).sort();
    assert.deepEqual(audited, committed);
    assert.equal((await verifyAuditLog(store.db)).ok, true);
    if (store.writer) {
      const { groups, units } = store.writer.stats;
      assert.equal(units, 60);
      assert.ok(groups < units, `60 units in ${groups} commits: grouped`);
    }
  });

  await t.test('a COMMIT that fails rejects every unit of its group and keeps none of them', async () => {
    // Hold the writer with a slow unit, so that the next ones are queued and committed together.
    const slow = store.commit(SLOW, { name: 'slow-1', ms: 150 });
    await new Promise((r) => setTimeout(r, 20));
    const group = await Promise.allSettled([store.commit(CHILD, { id: 11 }), store.commit(DANGLING, { id: 12 }), store.commit(CHILD, { id: 13 }), store.commit(ADD_TENANT, { name: 'innocent-1' })]);
    await slow;
    for (const o of group) assert.equal(o.status, 'rejected', 'the group failed as a whole');
    const reason = (group[0] as PromiseRejectedResult).reason as { code?: string; message: string };
    assert.match(`${reason.code} ${reason.message}`, /FOREIGN|foreign key|23503/i);
    assert.deepEqual((await sql<{ id: number }>`select id from writer_child order by id`.execute(store.db)).rows, []);
    assert.deepEqual(await tenantsLike(store, 'innocent-'), []);
    // The next group is unaffected.
    assert.deepEqual(await Promise.all([store.commit(CHILD, { id: 14 }), store.commit(ADD_TENANT, { name: 'innocent-2' })]), [14, 'innocent-2']);
    assert.deepEqual((await sql<{ id: number }>`select id from writer_child order by id`.execute(store.db)).rows.map((r) => Number(r.id)), [14]);
    assert.equal((await verifyAuditLog(store.db)).ok, true);
  });

  await t.test('bytes cross as Uint8Array and asBuffer gives a Buffer back', async () => {
    const bytes = randomBytes(33);
    assert.deepEqual(await store.commit(BYTES, { name: 'bytes-1', bytes }), { isBuffer: true, length: 33 });
    const row = await store.db.selectFrom('tenants').select('created_at').where('name', '=', 'bytes-1').executeTakeFirstOrThrow();
    assert.equal(row.created_at, bytes.toString('hex'));
  });

  await t.test('write transactions of the serving connection are not starved by back-to-back group commits', async () => {
    // 32 clients, each sending its next unit as soon as the last one committed; each unit holds the
    // writer for 3 ms, so it always has a group of ~32 in hand (~100 ms transactions, back to back). The
    // serving connection polls for the lock with back-off and gets it only when a poll falls into a gap
    // between two groups (measured without the writer yielding: mostly a few ms, but now and then over a
    // second); the writer lets it go next, so a wait is bounded by about one group.
    let stop = false;
    const lane = async (j: number): Promise<void> => {
      for (let i = 0; !stop; i++) await store.commit(SLOW, { name: `stream-${j}-${i}`, ms: 3 });
    };
    const stream = Promise.all(Array.from({ length: 32 }, (_, j) => lane(j)));
    await new Promise((r) => setTimeout(r, 100));
    const waits: number[] = [];
    for (let i = 0; i < 8; i++) {
      const t0 = Date.now();
      await store.writeTransaction(async (trx) => { await trx.insertInto('tenants').values({ name: `main-${i}`, created_at: nowIso() }).execute(); });
      waits.push(Date.now() - t0);
    }
    // At most about one group's time each (generous: the machine is shared).
    assert.ok(Math.max(...waits) < 1000, `main-thread write transactions waited ${waits.join(', ')} ms`);
    stop = true;
    await stream;
    assert.equal((await tenantsLike(store, 'main-')).length, 8);
    assert.equal((await verifyAuditLog(store.db)).ok, true);
  });

  if (target.dialect === 'sqlite') {
    await t.test('a writer thread that dies rejects the units it held (outcome unknown); the next unit starts a new one', async () => {
      const held = await Promise.allSettled([store.commit(ADD_TENANT, { name: 'before-crash' }), store.commit(CRASH, {}), store.commit(ADD_TENANT, { name: 'with-crash' })]);
      const crashed = held.filter((o) => o.status === 'rejected');
      assert.ok(crashed.length >= 2, 'the crashing unit and the ones it shared the thread with are rejected');
      for (const o of crashed) assert.ok(hasCode('DATABASE_UNAVAILABLE')((o as PromiseRejectedResult).reason));
      assert.match(((crashed[0] as PromiseRejectedResult).reason as Error).message, /writer thread stopped .*not known/);
      assert.equal(store.writer!.pending, 0);
      // A new thread takes over.
      assert.equal(await store.commit(ADD_TENANT, { name: 'after-crash' }), 'after-crash');
      assert.deepEqual(await tenantsLike(store, 'after-crash'), ['after-crash']);
      assert.equal((await verifyAuditLog(store.db)).ok, true);
    });
  }

  await t.test('close() finishes the units already handed over; later ones are refused', async () => {
    const second = await target.openStore();
    second.writeInBackground();
    const queued = Array.from({ length: 40 }, (_, i) => second.commit(ADD_TENANT, { name: `closing-${String(i).padStart(2, '0')}` }));
    const closed = second.close();
    const done = await Promise.allSettled(queued);
    await closed;
    assert.deepEqual(done.map((o) => o.status), Array(40).fill('fulfilled'));
    assert.equal((await tenantsLike(store, 'closing-')).length, 40);
    if (target.dialect === 'sqlite') await assert.rejects(second.commit(ADD_TENANT, { name: 'too-late' }), hasCode('DATABASE_UNAVAILABLE'));
    else await assert.rejects(second.commit(ADD_TENANT, { name: 'too-late' }));
    assert.deepEqual(await tenantsLike(store, 'too-late'), []);
  });
});
