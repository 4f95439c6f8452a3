// Migration 0008_device_indexes: devices_batch and devices_state lose the random UDID column (new devices
// then land on the last page of each index instead of a random one); the lookups they serve — a batch's
// devices, the suspended devices — still use them; down() restores (batch_id, udid) and (state, udid).

import assert from 'node:assert/strict';
import { Migrator, sql } from 'kysely';
import type { Store } from '../../src/store/database.js';
import { StaticMigrationProvider } from '../../src/store/migrations.js';
import { forEachDialect } from '../helpers/db.js';

async function indexColumns(store: Store, name: string): Promise<string[]> {
  if (store.dialect === 'postgres') {
    const def = (await sql<{ def: string }>`select indexdef as def from pg_indexes where indexname = ${name}`.execute(store.db)).rows[0]?.def ?? '';
    return (/\((.*)\)/.exec(def)?.[1] ?? '').split(',').map((c) => c.trim().replace(/"/g, '')).filter(Boolean);
  }
  return (await sql<{ name: string }>`select name from pragma_index_info(${name}) order by seqno`.execute(store.db)).rows.map((r) => r.name);
}

forEachDialect('migration 0008_device_indexes', async (t, target) => {
  const store = await target.openStore();
  const migrator = new Migrator({ db: store.db, provider: new StaticMigrationProvider(store.dialect) });

  await t.test('after the migration: (batch_id) and (state), without the UDID', async () => {
    assert.deepEqual(await indexColumns(store, 'devices_batch'), ['batch_id']);
    assert.deepEqual(await indexColumns(store, 'devices_state'), ['state']);
    if (store.dialect === 'sqlite') {
      const plan = async (q: string): Promise<string> => (await sql<{ detail: string }>`${sql.raw(`explain query plan ${q}`)}`.execute(store.db)).rows.map((r) => r.detail).join(' | ');
      assert.match(await plan(`select udid from devices where batch_id = 'b-1'`), /USING (COVERING )?INDEX devices_batch/);
      assert.match(await plan(`select udid from devices where state = 'suspended'`), /USING (COVERING )?INDEX devices_state/);
    }
  });

  await t.test('down to 0007 restores (batch_id, udid) and (state, udid); up again', async () => {
    const down = await migrator.migrateTo('0007_est_indexes');
    assert.equal(down.error, undefined, String(down.error));
    assert.deepEqual(await indexColumns(store, 'devices_batch'), ['batch_id', 'udid']);
    assert.deepEqual(await indexColumns(store, 'devices_state'), ['state', 'udid']);
    const up = await migrator.migrateToLatest();
    assert.equal(up.error, undefined, String(up.error));
    assert.deepEqual(await indexColumns(store, 'devices_batch'), ['batch_id']);
  });
});
