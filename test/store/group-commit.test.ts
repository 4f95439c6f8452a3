// GroupCommitter: units committed together (first without savepoints; when one refuses, the group runs
// again with a savepoint per unit); a refused unit leaves no trace and does not disturb the others; audit
// entries only for units that committed.

import assert from 'node:assert/strict';
import { verifyAuditLog } from '../../src/audit/audit-log.js';
import { HallmarkError } from '../../src/errors.js';
import { nowIso } from '../../src/store/database.js';
import { GroupCommitter } from '../../src/store/group-commit.js';
import { forEachDialect } from '../helpers/db.js';

forEachDialect('group commit', async (t, target) => {
  const store = await target.openStore();
  await store.db.insertInto('tenants').values({ name: 'counter', created_at: nowIso() }).execute();
  const committer = new GroupCommitter(store);

  await t.test('concurrent units: the refused ones roll back alone, the others commit, audit only for the committed', async () => {
    // Each unit inserts a tenant; every third one then refuses after its insert.
    const outcomes = await Promise.allSettled(Array.from({ length: 30 }, (_, i) => committer.run(async (trx) => {
      await trx.insertInto('tenants').values({ name: `unit-${i}`, created_at: nowIso() }).execute();
      if (i % 3 === 0) throw new HallmarkError('QUOTA_EXCEEDED', `unit ${i} refused`);
      return { result: i, audit: [{ actor: 'test', action: 'unit.commit', target: String(i) }] };
    })));
    const committed = outcomes.flatMap((o) => (o.status === 'fulfilled' ? [o.value] : []));
    assert.equal(committed.length, 20);
    for (const [i, o] of outcomes.entries()) {
      if (i % 3 === 0) assert.equal(o.status === 'rejected' && (o.reason as HallmarkError).code, 'QUOTA_EXCEEDED');
    }
    const tenants = (await store.db.selectFrom('tenants').select('name').where('name', 'like', 'unit-%').execute()).map((r) => r.name).sort();
    assert.deepEqual(tenants, committed.map((i) => `unit-${i}`).sort());
    const audited = await store.db.selectFrom('audit_log').select('target').where('action', '=', 'unit.commit').execute();
    assert.deepEqual(audited.map((r) => Number(r.target)).sort((a, b) => a - b), [...committed].sort((a, b) => a - b));
    assert.equal((await verifyAuditLog(store.db)).ok, true);
  });

  await t.test('a unit that breaks a constraint is refused alone', async () => {
    const [dup, fresh] = await Promise.allSettled([
      committer.run(async (trx) => { await trx.insertInto('tenants').values({ name: 'counter', created_at: nowIso() }).execute(); return { result: 1, audit: [] }; }),
      committer.run(async (trx) => { await trx.insertInto('tenants').values({ name: 'fresh', created_at: nowIso() }).execute(); return { result: 2, audit: [] }; }),
    ]);
    assert.equal(dup.status, 'rejected');
    assert.equal(fresh.status, 'fulfilled');
    assert.ok(await store.db.selectFrom('tenants').select('name').where('name', '=', 'fresh').executeTakeFirst());
  });

  await t.test('a group without refusals runs each unit once; one refusal reruns the group with savepoints, once', async () => {
    const runs = new Map<number, number>();
    const fresh = new GroupCommitter(store); // no refusal seen yet: starts optimistic
    const unit = (i: number, refuse: boolean) => fresh.run(async (trx) => {
      runs.set(i, (runs.get(i) ?? 0) + 1);
      await trx.insertInto('tenants').values({ name: `opt-${i}`, created_at: nowIso() }).execute();
      if (refuse) throw new HallmarkError('CLAIM_INVALID', `unit ${i} refused`);
      return { result: i, audit: [] };
    });
    assert.deepEqual(await Promise.all([0, 1, 2, 3].map((i) => unit(i, false))), [0, 1, 2, 3]);
    assert.deepEqual([...runs.values()], [1, 1, 1, 1]);
    runs.clear();
    const outcomes = await Promise.allSettled([10, 11, 12, 13].map((i) => unit(i, i === 12)));
    assert.deepEqual(outcomes.map((o) => o.status), ['fulfilled', 'fulfilled', 'rejected', 'fulfilled']);
    // 10 and 11 ran in the optimistic pass and again in the savepoint pass; 12 refused in both; 13 only in the second.
    assert.deepEqual(Object.fromEntries(runs), { 10: 2, 11: 2, 12: 2, 13: 1 });
    const kept = (await store.db.selectFrom('tenants').select('name').where('name', 'in', ['opt-10', 'opt-11', 'opt-12', 'opt-13']).execute()).map((r) => r.name).sort();
    assert.deepEqual(kept, ['opt-10', 'opt-11', 'opt-13']);
  });

  await t.test('a lone unit that fails leaves nothing', async () => {
    await assert.rejects(committer.run(async (trx) => {
      await trx.insertInto('tenants').values({ name: 'lonely', created_at: nowIso() }).execute();
      throw new HallmarkError('CLAIM_INVALID', 'no');
    }), (err: HallmarkError) => err.code === 'CLAIM_INVALID');
    assert.equal(await store.db.selectFrom('tenants').select('name').where('name', '=', 'lonely').executeTakeFirst(), undefined);
  });
});
