// WAL checkpoints in a worker thread (servers): automatic checkpoints are off on the serving
// connection, the worker keeps the log checkpointed, and stopping it turns them back on.

import assert from 'node:assert/strict';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import BetterSqlite3 from 'better-sqlite3';
import { Store, nowIso } from '../../src/store/database.js';
import { checkpointInBackground } from '../../src/store/sqlite-checkpointer.js';
import { makeTempDir } from '../helpers/tmp.js';
import { createRequire } from 'node:module';

test('the worker checkpoints the WAL while the serving connection does not', async () => {
  const dir = await makeTempDir('hallmark-checkpoint-');
  const file = join(dir.path, 'hallmark.db');
  try {
    const store = await Store.open({ url: file });
    store.checkpointInBackground(50);
    for (let i = 0; i < 300; i++) await store.db.insertInto('tenants').values({ name: `t-${i}-${'x'.repeat(500)}`, created_at: nowIso() }).execute();
    // Another connection sees what was written; after a few intervals, everything in the log has been copied back.
    const probe = new BetterSqlite3(file);
    let state: { busy: number; log: number; checkpointed: number } | undefined;
    for (let i = 0; i < 40; i++) {
      await new Promise((r) => setTimeout(r, 50));
      // TRUNCATE-free look: a PASSIVE checkpoint with nothing left to copy reports log == checkpointed.
      state = (probe.pragma('wal_checkpoint(PASSIVE)') as (typeof state)[])[0];
      if (state && state.log === state.checkpointed) break;
    }
    assert.ok(state && state.log === state.checkpointed, JSON.stringify(state));
    assert.equal((probe.prepare("select count(*) as n from tenants where name like 't-%'").get() as { n: number }).n, 300);
    probe.close();
    await store.close();
    assert.ok(existsSync(file) && statSync(file).size > 150_000, 'the rows reached the database file');
  } finally {
    await dir.cleanup();
  }
});

test('stopping the worker turns automatic checkpoints back on', async () => {
  const dir = await makeTempDir('hallmark-checkpoint-');
  try {
    const db = new BetterSqlite3(join(dir.path, 'x.db'));
    db.pragma('journal_mode = WAL');
    db.exec('create table t (x)');
    const c = checkpointInBackground(db, join(dir.path, 'x.db'), createRequire(import.meta.url).resolve('better-sqlite3'), 50);
    assert.equal(db.pragma('wal_autocheckpoint', { simple: true }), 0);
    await c.stop();
    assert.equal(db.pragma('wal_autocheckpoint', { simple: true }), 1000);
    db.close();
  } finally {
    await dir.cleanup();
  }
});
