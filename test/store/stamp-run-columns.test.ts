// Migration 0009_stamp_run_archive_and_owner: stamp_runs gains archive_name and archive_sha256
// (an encrypted run's archive, recorded before it is renamed into place) and owner and heartbeat_at (the
// process making the run); down() drops the four columns again.

import assert from 'node:assert/strict';
import { Migrator, sql } from 'kysely';
import type { Store } from '../../src/store/database.js';
import { StaticMigrationProvider } from '../../src/store/migrations.js';
import { forEachDialect } from '../helpers/db.js';

async function columns(store: Store): Promise<string[]> {
  if (store.dialect === 'postgres') {
    return (await sql<{ name: string }>`select column_name as name from information_schema.columns where table_name = 'stamp_runs' and table_schema = current_schema() order by ordinal_position`.execute(store.db)).rows.map((r) => r.name);
  }
  return (await sql<{ name: string }>`select name from pragma_table_info('stamp_runs') order by cid`.execute(store.db)).rows.map((r) => r.name);
}

forEachDialect('migration 0009_stamp_run_archive_and_owner', async (t, target) => {
  const store = await target.openStore();
  const migrator = new Migrator({ db: store.db, provider: new StaticMigrationProvider(store.dialect) });
  try {
    await t.test('down to 0008 drops the four columns; up adds them back', async () => {
      const added = ['archive_name', 'archive_sha256', 'owner', 'heartbeat_at'];
      assert.deepEqual((await columns(store)).filter((c) => added.includes(c)).sort(), added.slice().sort());
      const down = await migrator.migrateTo('0008_device_indexes');
      assert.equal(down.error, undefined, String(down.error));
      assert.deepEqual((await columns(store)).filter((c) => added.includes(c)), []);
      const up = await migrator.migrateToLatest();
      assert.equal(up.error, undefined, String(up.error));
      assert.deepEqual((await columns(store)).filter((c) => added.includes(c)).sort(), added.slice().sort());
    });
  } finally {
    await store.close();
  }
});
